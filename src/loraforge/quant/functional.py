"""Blockwise weight quantization: NF4 / FP4 (two codes per byte) and INT8, with double quantization.

A weight is flattened (row-major) and cut into blocks of `blocksize` values; each block is scaled by
its absolute maximum (absmax) into [-1, 1] and every value is rounded to the nearest level of the
codebook. Double quantization (QLoRA) then stores the float32 absmax values themselves as 8-bit codes:
their mean is subtracted and they are blockwise-quantized in blocks of 256 with the dynamic 8-bit map.

The 4-bit codes, nested statistics and dequantized values are bit-identical to bitsandbytes on CPU
(`quantize_4bit` / `dequantize_4bit`, with and without `compress_statistics`). The rules we follow
to get there, each one observable in its output:
  * values are scaled in float32: full blocks multiply by the float32 reciprocal of absmax, the last
    partial block divides by its absmax; an all-zero last block stores absmax 1e-38, not 0;
  * a value exactly halfway between two levels takes the lower one;
  * element 2i goes in the high nibble of byte i; an odd element count is padded with the code of 0;
  * nested codes come from a 65536-point grid lookup, not an exact nearest search (codebooks.py).
Everything is plain vectorized PyTorch, so the same code runs on CPU and CUDA; large weights are
processed in chunks of whole blocks to bound the temporary memory.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraforge.errors import LoraForgeError
from loraforge.ops.switch import reference_ops
from loraforge.quant.codebooks import (
    LUT_BINS,
    code_4bit,
    dynamic_code,
    dynamic_lut,
    rounding_table_4bit,
)

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
NESTED_BLOCKSIZE = 256  # QLoRA's block size for the double-quantized absmax
_CHUNK = 1 << 24  # values per chunk: bounds temporaries to ~100 MB whatever the weight size


def _chunk_len(blocksize: int) -> int:
    # Whole blocks (blocksize is even, so chunks also start on a byte of packed codes).
    return max(blocksize, _CHUNK - _CHUNK % blocksize)


@dataclass
class QuantState:
    """Everything needed to rebuild one quantized weight. All tensors live on one device.

    n = prod(shape) values, n_blocks = ceil(n / blocksize).
    """

    quant_type: str  # "nf4" | "fp4" | "int8"
    shape: torch.Size  # the original weight shape, e.g. [out, in]
    dtype: torch.dtype  # the original weight dtype; dequantize() returns it by default
    blocksize: int
    data: torch.Tensor  # nf4/fp4: uint8 [ceil(n/2), 1], two codes per byte; int8: int8 [*shape]
    absmax: torch.Tensor  # float32 [n_blocks], or uint8 [n_blocks] when double-quantized
    quant_map: torch.Tensor | None = None  # float32 [16] for nf4/fp4; int8 codes are linear (None)
    nested_absmax: torch.Tensor | None = None  # float32 [ceil(n_blocks/256)]
    nested_quant_map: torch.Tensor | None = None  # float32 [256], the dynamic map
    offset: torch.Tensor | None = None  # float32 [], mean of absmax subtracted before nesting
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def tensors(self) -> list[torch.Tensor]:
        """The stored tensors (no None), e.g. to count bytes or move devices."""
        fields = (
            self.data,
            self.absmax,
            self.quant_map,
            self.nested_absmax,
            self.nested_quant_map,
            self.offset,
        )
        return [t for t in fields if t is not None]


def check_config(quant_type: str, blocksize: int, where: str = "quantization") -> None:
    if quant_type not in QUANT_TYPES:
        raise LoraForgeError(f"{where}: quant_type {quant_type!r} is not one of {', '.join(QUANT_TYPES)}.")
    if blocksize not in BLOCKSIZES:
        raise LoraForgeError(f"{where}: blocksize {blocksize} is not one of {BLOCKSIZES}.")


# ---------------------------------------------------------------------------------------------
# absmax and double quantization
# ---------------------------------------------------------------------------------------------


def blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Per-block max |x| of a 1-D float tensor: float32 [ceil(n / blocksize)] (last block may be short)."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat.new_empty(-(-n // blocksize), dtype=torch.float32)
    absmax[: full // blocksize] = flat[:full].view(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax[-1] = flat[full:].abs().amax()
    return absmax


def quantize_absmax(absmax: torch.Tensor, blocksize: int = NESTED_BLOCKSIZE):
    """Double quantization: float32 absmax [B] -> (codes uint8 [B], nested_absmax float32 [ceil(B/256)],
    code float32 [256], offset float32 []).

    Absmax values are all positive and clustered, so the mean is subtracted first to spread them over
    the signed code range. Rounding goes through the 65536-point grid table like bitsandbytes' CPU
    kernel: normalise by multiplying with 1/absmax, clamp to [-1, 1], index (x + 1) / 2 * 65535 + 0.5
    truncated. A block whose values all equal the mean stores nested absmax 0 and codes 0.
    """
    offset = absmax.mean()  # float32 []; same reduction as the reference so the bits agree
    centered = absmax - offset  # float32 [B]
    n = centered.numel()
    code = dynamic_code(absmax.device)
    nested_absmax = blockwise_absmax(centered, blocksize)  # [NB]
    # inv: [NB]; 0 for all-zero blocks so that they index the grid safely (their code is forced to 0)
    inv = torch.where(nested_absmax > 0, 1.0 / nested_absmax, torch.zeros_like(nested_absmax))
    padded = F.pad(centered, (0, nested_absmax.numel() * blocksize - n)).view(-1, blocksize)
    normed = (padded * inv[:, None]).clamp_(-1.0, 1.0)  # [NB, blocksize]
    grid = ((normed + 1.0) * 0.5 * float(LUT_BINS - 1) + 0.5).to(torch.int64)  # truncation = floor here
    codes = dynamic_lut(absmax.device)[grid]  # uint8 [NB, blocksize]
    codes.masked_fill_((nested_absmax == 0)[:, None], 0)
    return codes.view(-1)[:n], nested_absmax, code, offset


def dequantize_absmax(state: QuantState) -> torch.Tensor:
    """The float32 block scales [n_blocks] of a state, undoing double quantization if present."""
    if not state.double_quant:
        return state.absmax.float()
    codes = state.absmax
    n = codes.numel()
    bs = state.nested_blocksize
    values = state.nested_quant_map[codes.long()]  # float32 [B]
    values = F.pad(values, (0, state.nested_absmax.numel() * bs - n)).view(-1, bs)
    return (values * state.nested_absmax[:, None]).view(-1)[:n] + state.offset


# ---------------------------------------------------------------------------------------------
# 4-bit (nf4 / fp4)
# ---------------------------------------------------------------------------------------------


def _quantize_4bit_chunk(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, midpoints, order):
    """float32 [m] (whole blocks, the last one maybe short), absmax [ceil(m/blocksize)] -> uint8 codes [m]."""
    m = flat.numel()
    full = m - m % blocksize
    scaled = torch.empty_like(flat)
    # Full blocks multiply by the reciprocal; the clamp keeps zero blocks finite (0 * 1e38 = 0).
    inv = 1.0 / absmax[: full // blocksize].clamp(min=1e-38)  # float32 [full / blocksize]
    scaled[:full] = (flat[:full].view(-1, blocksize) * inv[:, None]).view(-1)
    if full < m:
        scaled[full:] = flat[full:] / absmax[-1]  # the short last block divides (bitsandbytes does)
    scaled.clamp_(-1.0, 1.0)
    positions = torch.bucketize(scaled, midpoints, out_int32=True)  # int32 [m], ties -> lower level
    return order[positions]  # uint8 [m]


def quantize_4bit(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64):
    """weight [*shape] -> (packed uint8 [ceil(n/2), 1], absmax float32 [n_blocks])."""
    flat = weight.reshape(-1)
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    if n % blocksize:
        # A short last block of zeros stores 1e-38 (bitsandbytes clamps only that block's absmax).
        absmax[-1] = absmax[-1].clamp(min=1e-38)
    midpoints, order = rounding_table_4bit(quant_type, weight.device)
    zero_code = order[torch.bucketize(torch.zeros((), device=weight.device), midpoints)]
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=weight.device)
    chunk = _chunk_len(blocksize)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block_absmax = absmax[start // blocksize : -(-stop // blocksize)]
        codes = _quantize_4bit_chunk(flat[start:stop].float(), block_absmax, blocksize, midpoints, order)
        if codes.numel() % 2:  # only the very last chunk can be odd: pad with the code of 0.0
            codes = torch.cat([codes, zero_code.view(1)])
        packed[start // 2 : (start + codes.numel()) // 2] = (codes[0::2] << 4) | codes[1::2]
    return packed.view(-1, 1), absmax


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """byte b -> (code[b >> 4], code[b & 15]), both float32s in one int64 [256]: one gather per byte decodes
    both nibbles in order. A 1-D gather of 8-byte words is 2.7x faster than gathering rows of a [256, 2]
    float table (1536 x 576 weight, 2 threads: 165 vs 440 us)."""
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # float32 [256, 2]
    return pairs.view(torch.int64).view(256)


def dequantize_4bit_ref(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape, dtype
) -> torch.Tensor:
    """The definition dequantize_4bit computes: value i = code[nibble i] * absmax[i // blocksize] in float32,
    rounded once to `dtype`; element 2i is byte i's high nibble. Whole-weight temporaries (int64 codes)."""
    n = math.prod(shape)
    b = packed.reshape(-1)
    nibbles = torch.stack([b >> 4, b & 15], dim=1).reshape(-1)[:n].long()  # [n]
    scale = absmax.float().repeat_interleave(blocksize)[:n]  # [n]
    return (code.float()[nibbles] * scale).to(dtype).view(shape)


# Values per dequantize step into a 16-bit dtype. A step's gathered float32 pairs (0.5 MB) stay in a core's
# L2 cache from the gather to the scaling and the cast that read them back, and a reused buffer is not
# fresh pages for the kernel to zero each time. bench/quant.py's bf16 dequantize row and bench/ab_ops.py
# measure it (into bf16, 1 thread, CPU time: 12288 x 576 0.27-0.64x one 2^24-value step, 576 x 1536
# 0.81-0.93x, 576 x 576 0.95-1.0x).
_DEQUANT_CHUNK = 1 << 17


def dequantize_4bit(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape, dtype
) -> torch.Tensor:
    """packed uint8 [ceil(n/2), 1], float32 absmax [n_blocks], code [16] -> [*shape] in `dtype`, equal bit for
    bit to dequantize_4bit_ref (the plain definition; ops.use_reference() runs it instead).

    One gather of the pair table decodes both nibbles of each byte; each value is then scaled by its
    block's absmax (a [blocks, 1] broadcast) in float32 and rounded once to `dtype`. Into float32 (with an
    even count) the pairs are gathered straight into the output and scaled there; into another dtype,
    _DEQUANT_CHUNK values at a time through a reused float32 buffer (a multiply whose out= has another
    dtype is not vectorised on CPU, so the scaling and the cast are two passes over that cached buffer).
    """
    if reference_ops():
        return dequantize_4bit_ref(packed, absmax, code, blocksize, shape, dtype)
    n = math.prod(shape)
    table = _pair_table(code.float())  # int64 [256]
    out = torch.empty(n, dtype=dtype, device=packed.device)
    flat_bytes = packed.reshape(-1)
    if dtype == torch.float32 and n % 2 == 0:
        words = out.view(torch.int64)  # [n / 2]: a value pair per byte
        chunk = _chunk_len(blocksize)  # L2-sized steps measured no faster here (0.9-1.1x)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            byte_idx = flat_bytes[start // 2 : stop // 2].to(torch.int32)  # index_select's index type
            torch.index_select(table, 0, byte_idx, out=words[start // 2 : stop // 2])
            _scale_blocks(out[start:stop], absmax[start // blocksize : -(-stop // blocksize)], blocksize)
        return out.view(shape)
    chunk = max(blocksize, _DEQUANT_CHUNK - _DEQUANT_CHUNK % blocksize)  # whole blocks, so an even count
    idx = torch.empty(min(chunk, n + 1) // 2, dtype=torch.int32, device=packed.device)  # reused per step
    pairs = torch.empty(idx.shape, dtype=torch.int64, device=packed.device)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m, nbytes = stop - start, (stop - start + 1) // 2
        i = idx[:nbytes]
        i.copy_(flat_bytes[start // 2 : start // 2 + nbytes])
        values = torch.index_select(table, 0, i, out=pairs[:nbytes]).view(torch.float32)[:m]  # [m]
        _scale_blocks(values, absmax[start // blocksize : -(-stop // blocksize)], blocksize)
        out[start:stop] = values
    return out.view(shape)


def _scale_blocks(values: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """float32 [m] * per-block absmax [ceil(m/blocksize)], in place."""
    m = values.numel()
    full = m - m % blocksize
    values[:full].view(-1, blocksize).mul_(absmax[: full // blocksize, None])
    if full < m:
        values[full:].mul_(absmax[-1])
    return values


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------


def quantize_int8(weight: torch.Tensor, blocksize: int = 64):
    """weight [*shape] -> (codes int8 [*shape], absmax float32 [n_blocks]); x ~= code * absmax / 127."""
    flat = weight.reshape(-1)
    n = flat.numel()
    absmax = blockwise_absmax(flat, blocksize)
    # scale: [n_blocks]; 0 for all-zero blocks so they give code 0 rather than 0 * inf = nan
    scale = torch.where(absmax > 0, 127.0 / absmax, torch.zeros_like(absmax))
    codes = torch.empty(n, dtype=torch.int8, device=weight.device)
    chunk = _chunk_len(blocksize)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        values = flat[start:stop].to(torch.float32, copy=True)  # scaled in place below
        _scale_blocks(values, scale[start // blocksize : -(-stop // blocksize)], blocksize)
        codes[start:stop] = values.round_().clamp_(-127, 127)  # round half to even
    return codes.view(weight.shape), absmax


def dequantize_int8(codes: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype) -> torch.Tensor:
    n = math.prod(shape)
    step = absmax / 127.0  # float32 [n_blocks]: the value of code 1 in each block
    out = torch.empty(n, dtype=dtype, device=codes.device)
    chunk = _chunk_len(blocksize)
    flat = codes.reshape(-1)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        block_step = step[start // blocksize : -(-stop // blocksize)]
        out[start:stop] = _scale_blocks(flat[start:stop].float(), block_step, blocksize)
    return out.view(shape)


# ---------------------------------------------------------------------------------------------
# the public pair
# ---------------------------------------------------------------------------------------------


def quantize(
    weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True
) -> QuantState:
    """Quantize a float weight (fp32/bf16/fp16, any shape) on its own device."""
    check_config(quant_type, blocksize)
    if weight.dtype not in FLOAT_DTYPES:
        raise LoraForgeError(
            f"quantization: weight dtype {weight.dtype} is not float32, bfloat16 or float16."
        )
    if weight.numel() == 0:
        raise LoraForgeError("quantization: the weight is empty.")
    weight = weight.detach()
    if quant_type == "int8":
        data, absmax = quantize_int8(weight, blocksize)
        quant_map = None
    else:
        data, absmax = quantize_4bit(weight, quant_type, blocksize)
        quant_map = code_4bit(quant_type, weight.device)
    state = QuantState(quant_type, weight.shape, weight.dtype, blocksize, data, absmax, quant_map)
    if double_quant:
        state.absmax, state.nested_absmax, state.nested_quant_map, state.offset = quantize_absmax(absmax)
    return state


def zeros_state(
    shape, quant_type: str, blocksize: int, double_quant: bool, dtype=torch.float32, device=None
) -> QuantState:
    """A state of the right tensor shapes that dequantizes to zeros: a placeholder for loading."""
    check_config(quant_type, blocksize)
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    if quant_type == "int8":
        data, quant_map = torch.zeros(shape, dtype=torch.int8, device=device), None
    else:
        data = torch.zeros((n + 1) // 2, 1, dtype=torch.uint8, device=device)
        quant_map = code_4bit(quant_type, device)
    state = QuantState(quant_type, torch.Size(shape), dtype, blocksize, data, None, quant_map)
    if double_quant:
        state.absmax = torch.zeros(n_blocks, dtype=torch.uint8, device=device)
        state.nested_absmax = torch.zeros(
            -(-n_blocks // NESTED_BLOCKSIZE), dtype=torch.float32, device=device
        )
        state.nested_quant_map = dynamic_code(device)
        state.offset = torch.zeros((), dtype=torch.float32, device=device)
    else:
        state.absmax = torch.zeros(n_blocks, dtype=torch.float32, device=device)
    return state


def dequantize(state: QuantState, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rebuild the weight [*state.shape] in `dtype` (default: the original dtype)."""
    dtype = dtype or state.dtype
    absmax = dequantize_absmax(state)
    if state.quant_type == "int8":
        return dequantize_int8(state.data, absmax, state.blocksize, state.shape, dtype)
    return dequantize_4bit(state.data, absmax, state.quant_map, state.blocksize, state.shape, dtype)


def quantized_nbytes(quantized) -> int:
    """Bytes stored for a quantized weight (a QuantState, or a module with `.quant_state` such as
    QuantLinear): codes, scales, nested scales, offset and tables; not the bias."""
    state = getattr(quantized, "quant_state", quantized)
    return sum(t.numel() * t.element_size() for t in state.tensors())


def bits_per_parameter(quantized) -> float:
    """Stored bits per weight value, from the real tensor sizes (NF4 + double quant: about 4.13)."""
    state = getattr(quantized, "quant_state", quantized)
    return 8.0 * quantized_nbytes(state) / state.numel


__all__ = [
    "BLOCKSIZES",
    "QUANT_TYPES",
    "QuantState",
    "bits_per_parameter",
    "dequantize",
    "dequantize_absmax",
    "quantize",
    "quantized_nbytes",
    "zeros_state",
]
