"""Backends lower a packed graph to something that runs. Registered under the `xbitc.backends` entry points."""
from .base import Backend, Program

__all__ = ["Backend", "Program"]
