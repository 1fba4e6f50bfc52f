"""Blockwise quantization of frozen weights (NF4, FP4, INT8 with optional double quantization).

bitsandbytes-exact codes and on-disk layout, written in plain PyTorch:

    codebooks.py   the 4-bit level tables and the dynamic 8-bit map for nested absmax
    functional.py  quantize / dequantize, QuantState, bits_per_parameter
    serialize.py   the bitsandbytes (and our int8) checkpoint layout of one weight
    linear.py      QuantLinear (frozen, dequantize-then-matmul) and quantize_linears
    checkpoint.py  quantized model folders: QuantSpec, quantization_config, which weights are stored quantized
    export.py      write_quantized_model: a pre-quantized copy of a model folder (`loraforge quantize`)
"""

from loraforge.quant.checkpoint import QuantSpec
from loraforge.quant.export import write_quantized_model
from loraforge.quant.functional import (
    QUANT_TYPES,
    QuantState,
    bits_per_parameter,
    dequantize,
    quantize,
    quantized_nbytes,
)
from loraforge.quant.linear import (
    QuantLinear,
    QuantMatmul,
    cache_dense_weights,
    linear_names,
    quantize_linears,
)
from loraforge.quant.serialize import state_from_tensors, state_names, state_to_tensors

__all__ = [
    "QUANT_TYPES",
    "QuantLinear",
    "QuantMatmul",
    "QuantSpec",
    "QuantState",
    "bits_per_parameter",
    "cache_dense_weights",
    "dequantize",
    "linear_names",
    "quantize",
    "quantize_linears",
    "quantized_nbytes",
    "state_from_tensors",
    "state_names",
    "state_to_tensors",
    "write_quantized_model",
]
