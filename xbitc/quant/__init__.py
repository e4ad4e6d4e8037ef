"""Quantization numerics: packing, grids, RTN and GPTQ. Pure tensor code, no graph knowledge."""
