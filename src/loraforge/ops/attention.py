"""Causal grouped-query attention for 16-bit training steps on CPU: PyTorch's flash attention forward,
and a backward written as five batched products and two compiled elementwise kernels.

PyTorch's CPU flash-attention backward spends 7x its forward's time (SmolLM2-135M's attention, 4 x 256
tokens, 9 query / 3 key-value heads, bf16, 2 threads: 1.7 ms forward, ~11.5 ms backward, masked blocks
included), the largest single op of a bf16 LoRA step (~16% of it). At 256 tokens a head's [S, S]
probabilities fit in memory, so the backward here rebuilds them from the forward's log-sum-exp with
matrix products (the equations of Dao's FlashAttention-2 backward):

    P = exp(scale * Q K^T - lse) (causal)   dV = P^T dO   dP = dO V^T
    dS = P * (dP - rowsum(dO * O)) * scale   dQ = dS K   dK = dS^T Q

The query heads that share a key-value head are stacked along the rows ([G * S, D] against [S, D]), so
grouped-query attention needs neither a copy of K / V per query head nor a sum of dK / dV over the group.
Q K^T and dO V^T are computed in fp32: a bf16 product rounds its output, the exponential turns a
score's rounding error of 2^-9 |s| into a relative error of P, and dP - rowsum(dO * O) cancels (with
dP rounded to bf16, dQ's error was twice flash attention's). P and dS go into the other three products
in bf16, as in flash attention. Measured against float64, the output and gradients are within 1.5x of
flash attention's own errors (tests/test_ops.py). The reference is F.scaled_dot_product_attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import compiled_kernels, kernel


def causal_attention_ref(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> Tensor:
    """softmax(scale * q k^T + causal mask) v; q: [B, H, S, D], k/v: [B, Hkv, S, D] with H a multiple of Hkv."""
    if (
        compiled_kernels(q)  # 16-bit CPU training
        and k.dtype == v.dtype == q.dtype
        and k.shape[2] == q.shape[2]
        and q.shape[1] % k.shape[1] == 0
    ):
        return _CausalAttention.apply(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)
    return causal_attention_ref(q, k, v, scale)


@kernel
def _probs_kernel(s: Tensor, lse: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    """P [B, Hkv, G, S, S] in `dtype` from fp32 scores s (same shape) and lse [B, Hkv, G, S, 1], causal."""
    n = s.shape[-1]
    i = torch.arange(n, device=s.device)
    return torch.where(i[:, None] >= i[None, :], (s * scale - lse).exp(), 0.0).to(dtype)


@kernel
def _dscores_kernel(p: Tensor, dp: Tensor, go: Tensor, o: Tensor, scale: float) -> Tensor:
    """dS [B, Hkv, G, S, S] from P, dP (same shape) and dO, O [B, Hkv, G, S, D]."""
    delta = (go.float() * o.float()).sum(-1, keepdim=True)  # [.., S, 1] = rowsum(dO * O) = rowsum(P * dP)
    return (p.float() * (dp.float() - delta) * scale).to(p.dtype)


class _CausalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        with torch.autocast(q.device.type, enabled=False):
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)  # lse: [B, H, S] fp32
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, go: Tensor):
        q, k, v, o, lse = ctx.saved_tensors
        B, H, S, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        with torch.autocast(q.device.type, enabled=False):
            q3 = q.reshape(B, Hkv, G * S, D)  # a group's query heads stacked along the rows
            go3 = go.to(q.dtype).reshape(B, Hkv, G * S, D)
            s = torch.matmul(q3.float(), k.float().transpose(-1, -2)).view(B, Hkv, G, S, S)  # fp32 scores
            p = _probs_kernel(s, lse.view(B, Hkv, G, S, 1), ctx.scale, q.dtype)
            del s
            p3 = p.view(B, Hkv, G * S, S)
            dv = torch.matmul(p3.transpose(-1, -2), go3)  # [B, Hkv, S, D]
            dp = torch.matmul(go3.float(), v.float().transpose(-1, -2)).view(B, Hkv, G, S, S)  # fp32
            ds = _dscores_kernel(p, dp, go3.view(B, Hkv, G, S, D), o.reshape(B, Hkv, G, S, D), ctx.scale)
            del p, p3, dp
            ds3 = ds.view(B, Hkv, G * S, S)
            dq = torch.matmul(ds3, k).view(B, H, S, D)
            dk = torch.matmul(ds3.transpose(-1, -2), q3)
        return dq, dk, dv, None
