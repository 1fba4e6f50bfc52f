"""Dropout masks drawn 16 bits at a time, made as 0/1 in the compute dtype without a bool in between.

F.dropout draws one random number per element (bernoulli_, ~6 ns each on CPU), and in a bf16 LoRA
training step the masks of the adapters' inputs cost more than all the adapters' products: 20% of the
step's CPU time on the embedded model (torch.profiler, 1 thread, batch 2 x 256, r = 16). Here each
64-bit draw gives four 16-bit uniforms, and an element is kept when its uniform is at least p * 2^16:
the same distribution up to p's rounding to a multiple of 2^-16 (0.05 -> 0.050003), ~4x fewer draws
(tests/test_ops.py checks the keep rate).

The mask is the multiplier's 0/1, not a bool: on CPU a comparison into bool and a bool -> bf16 cast are
scalar loops (0.29 and 0.57 ms for 512 x 576, a bf16 multiply 0.11 ms), while the int16 clamp, subtract
and multiply below are vectorised (~0.03 ms each). For a 16-bit float the 0/1 integers times the bit
pattern of 1.0 are the mask's bits. The 1 / (1 - p) scale is not in the mask: dropout_ref multiplies by
it, and ops.lora folds it into the low-rank scale s (a GEMM's alpha, applied in the accumulator).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .switch import compute_dtype


def dropout_mask(x: Tensor, p: float, dtype: torch.dtype | None = None) -> Tensor:
    """[x.shape]: 1 = keep (probability 1 - p), 0 = drop, in `dtype` (default: the dtype products on x run
    in, see switch.compute_dtype; torch.bool gives True = keep), from torch's default generator of x's device."""
    dtype = compute_dtype(x) if dtype is None else dtype
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device).random_(-(2**63), None)
    u = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-2^15, 2^15)
    c = round(p * 65536) - 32768  # keep u >= c
    if dtype == torch.bool:
        return u >= c
    if c == -32768:  # p < 2^-17 rounds to 0: keep all (and c - 1 below would leave int16)
        return torch.ones(x.shape, dtype=dtype, device=x.device)
    if c >= 32768:  # p > 1 - 2^-17: drop all
        return torch.zeros(x.shape, dtype=dtype, device=x.device)
    keep = u.clamp_(c - 1, c).sub_(c - 1)  # int16 0/1
    if dtype.is_floating_point and dtype.itemsize == 2:
        one = torch.ones((), dtype=dtype).view(torch.int16).item()  # 1.0's bits: 0x3F80 in bf16
        return keep.mul_(one).view(dtype)
    return keep.to(dtype)


def dropout_ref(x: Tensor, keep: Tensor, p: float) -> Tensor:
    """Inverted dropout with a given 0/1 (or bool) mask: kept elements scaled by 1 / (1 - p)."""
    return (x * keep) * (1.0 / (1.0 - p))
