"""GGUF quant formats used by DS4: numpy block layouts, dequantizers, activation
quantization twins of the reference CPU path, and random valid blocks."""

from ds4nb.quants.activation import (
    dequantize_q8_0_activation,
    dequantize_q8_K_activation,
    quantize_q8_0,
    quantize_q8_K,
)
from ds4nb.quants.formats import (
    BLOCK_DTYPE,
    SUPPORTED_TYPES,
    block_size,
    dequantize,
    dequantize_rows,
    row_bytes,
    type_size,
)
from ds4nb.quants.random_blocks import random_blocks

__all__ = [
    "BLOCK_DTYPE",
    "SUPPORTED_TYPES",
    "block_size",
    "dequantize",
    "dequantize_q8_0_activation",
    "dequantize_q8_K_activation",
    "dequantize_rows",
    "quantize_q8_0",
    "quantize_q8_K",
    "random_blocks",
    "row_bytes",
    "type_size",
]
