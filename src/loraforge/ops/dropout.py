"""Dropout masks drawn 16 bits at a time, made as 0/1 in the compute dtype without a bool in between.

F.dropout draws one random number per element (bernoulli_, ~6 ns each on CPU), and in a bf16 LoRA
training step the masks of the adapters' inputs cost more than all the adapters' products: 20% of the
step's CPU time on the embedded model (torch.profiler, 1 thread, batch 2 x 256, r = 16). Here each
64-bit draw gives four 16-bit uniforms, and an element is kept when its uniform is at least p * 2^16:
the same distribution up to p's rounding to a multiple of 2^-16 (0.05 -> 0.050003), ~4x fewer draws
(tests/test_ops.py checks the keep rate).

On CPU the 64-bit words come from numpy's SFC64 (Doty-Humphrey's Small Fast Chaotic generator), seeded
for each mask by one draw from torch's default generator: 0.56 ms for a [1024, 576] mask's words against
1.18 ms for torch's mt19937 `random_`. Seeding from torch's generator keeps what users rely on: one
torch.manual_seed reproduces every mask, and a checkpoint that saves torch's RNG state resumes the same
masks. On other devices the words come from the device's own generator.

The mask is the multiplier's 0/1, not a bool: on CPU a comparison into bool and a bool -> bf16 cast are
scalar loops (0.29 and 0.57 ms for 512 x 576, a bf16 multiply 0.11 ms), while the int16 clamp, subtract
and multiply below are vectorised (~0.03 ms each). For a 16-bit float the 0/1 integers times the bit
pattern of 1.0 are the mask's bits. The 1 / (1 - p) scale is not in the mask: dropout_ref multiplies by
it, and ops.lora folds it into the low-rank scale s (a GEMM's alpha, applied in the accumulator).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .switch import compute_dtype


def _words(count: int, device: torch.device) -> Tensor:
    """[count] uniform random int64."""
    if device.type == "cpu":
        seed = int(torch.empty((), dtype=torch.int64).random_())  # from torch's default generator
        return torch.from_numpy(np.random.SFC64(seed).random_raw(count).view(np.int64))
    return torch.empty(count, dtype=torch.int64, device=device).random_(-(2**63), None)


def dropout_mask(x: Tensor, p: float, dtype: torch.dtype | None = None) -> Tensor:
    """[x.shape]: 1 = keep (probability 1 - p), 0 = drop, in `dtype` (default: the dtype products on x run
    in, see switch.compute_dtype; torch.bool gives True = keep), from torch's default generator of x's device."""
    dtype = compute_dtype(x) if dtype is None else dtype
    n = x.numel()
    u = _words((n + 3) // 4, x.device).view(torch.int16)[:n].view(x.shape)  # uniform on [-2^15, 2^15)
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
