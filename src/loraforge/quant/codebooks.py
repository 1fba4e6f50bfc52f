"""The fixed value tables ("codebooks") that quantized codes index into.

A 4-bit weight code is an index into a 16-entry table of values in [-1, 1]; multiplying by the
block's absmax gives the weight back. The nested (double-quant) absmax codes index a 256-entry table.
All tables are built bit-identically to the ones bitsandbytes writes into checkpoints, because the
tables are saved next to the codes and a reader uses whichever table the file carries.
"""

from functools import cache

import torch

# The 16 NormalFloat levels of the QLoRA paper: quantiles of N(0, 1) scaled to [-1, 1], with 8
# positive and 7 negative non-zero levels so that 0 is exact. Sorted, so code index order equals
# value order. The literals are exact float32 values.
NF4_LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# FP4 is a real float format (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2), so the table is
# in bit-pattern order, not value order: code 0b0eem -> +value, 0b1eem -> -value. These are the
# unnormalised magnitudes of the patterns 0b000..0b111; dividing by the largest (12) maps to [-1, 1].
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)

# bitsandbytes' CPU 8-bit quantizer does not search the codebook per value: it snaps the normalised
# value to a uniform grid of 65536 points on [-1, 1] and looks the code up in a precomputed table.
# We use the same grid so that nested absmax codes match it byte for byte (see functional.quantize_absmax).
LUT_BINS = 65536


@cache
def _code_4bit_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32)
    magnitudes = torch.tensor(FP4_MAGNITUDES, dtype=torch.float32)
    # -0.0 for pattern 0b1000 is kept: the table is saved as-is and it costs nothing.
    return torch.cat([magnitudes, -magnitudes]) / magnitudes.max()


def code_4bit(quant_type: str, device: torch.device | str | None = None) -> torch.Tensor:
    """The 16-value table of `quant_type` ("nf4" or "fp4"), float32 [16], indexed by the 4-bit code."""
    return _code_4bit_cpu(quant_type).to(device, copy=True)  # a copy: callers store it as a buffer


@cache
def _sorted_4bit_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    code = _code_4bit_cpu(quant_type)
    # FP4 has +0 (code 0) and -0 (code 8): a stable sort puts code 0 first, so values that round to
    # zero from below get code 0 and those just above zero get code 8, as bitsandbytes does.
    values, order = torch.sort(code, stable=True)
    midpoints = (values[:-1] + values[1:]) / 2  # float32 [15]
    return midpoints, order.to(torch.uint8)


def rounding_table_4bit(quant_type: str, device: torch.device | str | None = None):
    """(midpoints float32 [15], sorted position -> code uint8 [16]) for round-to-nearest.

    A value equal to a midpoint rounds to the lower level (`torch.bucketize(..., right=False)`).
    """
    midpoints, order = _sorted_4bit_cpu(quant_type)
    return midpoints.to(device), order.to(device)


@cache
def _dynamic_code_cpu() -> torch.Tensor:
    # The signed "dynamic" 8-bit map of Dettmers (2015), used for the nested absmax: 1 sign bit, and
    # for each decade 10^-6 .. 10^0 a linear fraction whose resolution doubles per decade (1, 2, 4, ...
    # 64 levels), plus 0 and 1. Built in float32 exactly as bitsandbytes builds it (same linspace,
    # same float32 products) so that the saved table is bit-identical.
    levels = [torch.tensor([0.0, 1.0])]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        centers = (edges[:-1] + edges[1:]) / 2.0
        decade = centers * 10.0 ** (i - 6) if i < 6 else centers  # float32 product, like the reference
        levels += [decade, -decade]
    return torch.sort(torch.cat(levels)).values  # float32 [256], strictly increasing


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The signed dynamic 8-bit table, float32 [256], sorted; the code of a value is its index."""
    return _dynamic_code_cpu().to(device, copy=True)  # a copy: callers store it as a buffer


@cache
def _dynamic_lut_cpu() -> torch.Tensor:
    code = _dynamic_code_cpu()
    i = torch.arange(LUT_BINS, dtype=torch.float32)
    grid = -1.0 + (2.0 * i) / float(LUT_BINS - 1)  # float32 [65536], the grid points on [-1, 1]
    midpoints = 0.5 * (code[:-1] + code[1:])  # float32 [255]
    # A grid point's code is the number of midpoints strictly below it (ties -> lower code).
    return torch.searchsorted(midpoints, grid, side="left").to(torch.uint8)


def dynamic_lut(device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 [LUT_BINS]: the dynamic-map code of each grid point -1 + 2i / 65535 (float32)."""
    return _dynamic_lut_cpu().to(device)
