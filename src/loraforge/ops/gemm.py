"""Frozen linear products for inference, in the GEMM form that is fastest for a few tokens on CPU.

Few-token products on CPU (decoding a batch): W [out, in] @ x^T [in, T], with x^T the transposed view of
a row-major x, reads the weight in its stored order and runs up to 4x faster than F.linear's x @ W^T for
2 <= T <= 64 with MKL on 2 cores (SmolLM2's head at T = 2: 2.7 vs 14.5 ms; 576 -> 1536 at T = 8: 166 vs
275 us). Two exceptions, measured with cold weights: a contiguous x^T [in, T] (e.g. the transpose of a
previous product of this form) takes a 2x slower MKL path, so x is made row-major first (a [T, in] copy);
and for a long input (in >= 1024: the MLP's down projection) at 5 <= T <= 11, F.linear's kernel wins
(1536 -> 576 at T = 8: 239 vs 283 us; 1536 -> 128: 52 vs 66 us; 576 -> 192 is the other way round).
At T = 1 both are a GEMV. A low-rank factor (a side of at most SKINNY_MIN_SIDE: LoRA's A [r, in] and
B [out, r]) is small enough to sit in cache, and there F.linear is ~2x faster (8 tokens, 576 -> 16 -> 1536:
60 vs 103 us). `bench/` and tests/test_model.py::test_frozen_linear_equals_f_linear hold the
check; the reference is F.linear itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .switch import reference_ops

SKINNY_MAX_TOKENS = 64
SKINNY_MIN_SIDE = 64


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, contiguous: bool = True) -> Tensor:
    """F.linear(x, weight, bias), in the faster GEMM form for a few tokens when no gradient is recorded.

    That form computes the [out, T] transpose; contiguous=False returns its [T, out] view without the
    copy, for a consumer that only reads it (the copy is 4 ms of a 10 ms head product at T = 8; layers'
    outputs stay contiguous, as the ops after them (norms, rotary embedding, attention, even silu(gate) * up)
    ran slower on the strided view than the copy costs).
    Grad mode is always off inside an autograd.Function's forward, so call it outside one.
    """
    T = x.numel() // x.shape[-1] if x.shape[-1] else 0
    out_f, in_f = weight.shape
    if (
        reference_ops()
        or not (1 < T <= SKINNY_MAX_TOKENS and x.device.type == "cpu" and not torch.is_grad_enabled())
        or (in_f >= 1024 and 5 <= T <= 11)
        or min(out_f, in_f) <= SKINNY_MIN_SIDE
        or torch.is_autocast_enabled("cpu")
        or x.dtype != weight.dtype
    ):
        return F.linear(x, weight, bias)
    x2 = x.reshape(T, in_f)
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = (weight @ x2.t() if bias is None else torch.addmm(bias[:, None], weight, x2.t())).t()  # [T, out]
    return (out.contiguous() if contiguous else out).view(*x.shape[:-1], out_f)
