"""Rotary position embedding (Su et al., RoFormer): x * cos + rotate_half(x) * sin."""

from __future__ import annotations

import torch
from torch import Tensor

from .switch import reference_ops


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    # q: [B, H, S, D], k: [B, Hkv, S, D], cos/sin: [B, 1, S, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def apply_rope(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if reference_ops():
        return apply_rope_ref(q, k, cos, sin)
    return _RopeFn.apply(q, cos, sin), _RopeFn.apply(k, cos, sin)


class _RopeFn(torch.autograd.Function):
    """x * cos + rotate_half(x) * sin in one output buffer; the backward is the inverse rotation.

    Autograd of the plain expression allocates five [B, H, S, D] temporaries forward and as many
    backward; this writes the output once and the gradient once. The output has the promoted dtype of
    x and cos, as the plain expression has.
    """

    @staticmethod
    def forward(ctx, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.x_dtype = x.dtype
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        dx = g * cos  # rotate_half's transpose maps (a, b) to (b, -a)
        dx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        return dx.to(ctx.x_dtype), None, None
