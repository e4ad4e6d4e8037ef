"""xbitc: an X-bit model compiler."""
__version__ = "0.1.0"
