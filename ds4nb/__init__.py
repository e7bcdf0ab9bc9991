"""ds4nb: DeepSeek V4 Flash (DS4) GGUF inference with Numba-CUDA kernels."""

__version__ = "0.1.0"
