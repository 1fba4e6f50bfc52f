"""Grouped-query self-attention, configured per family: separate or fused (Phi-3) q/k/v projections,
optional q/k RMSNorm (per head: Qwen3, Gemma 3; over the whole projection: OLMo 2), rotary embedding, an
optional sliding window (a mask, made by the decoder) and Gemma 2's soft-capped scores.

Module names follow transformers (``q_proj`` ... ``o_proj``, ``qkv_proj``, ``q_norm``/``k_norm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import apply_rope, causal_attention
from .cache import KVCache
from .config import ModelConfig
from .linear import Linear
from .norm import RMSNorm


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.window = cfg.layer_windows[layer_idx]
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        h, q_out, kv_out = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.fused = cfg.fused_qkv
        if self.fused:
            self.qkv_proj = Linear(h, q_out + 2 * kv_out, bias=cfg.qkv_bias)
        else:
            self.q_proj = Linear(h, q_out, bias=cfg.qkv_bias)
            self.k_proj = Linear(h, kv_out, bias=cfg.qkv_bias)
            self.v_proj = Linear(h, kv_out, bias=cfg.qkv_bias)
        self.o_proj = Linear(q_out, h, bias=cfg.o_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm is not None:
            per_head = cfg.qk_norm == "head"
            self.q_norm = RMSNorm(self.head_dim if per_head else q_out, cfg.rms_norm_eps, cfg.norm_unit_offset)
            self.k_norm = RMSNorm(self.head_dim if per_head else kv_out, cfg.rms_norm_eps, cfg.norm_unit_offset)

    def project(self, x: Tensor, adapter_ids: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """x: [B, S, hidden] -> q: [B, S, H*D], k, v: [B, S, Hkv*D] (q/k normed when the whole projection is)."""
        if self.fused:
            q, k, v = self.qkv_proj(x, adapter_ids).split(
                [self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim], dim=-1)
        else:
            q, k, v = self.q_proj(x, adapter_ids), self.k_proj(x, adapter_ids), self.v_proj(x, adapter_ids)
        if self.qk_norm == "proj":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        adapter_ids: Tensor | None,
        cache: KVCache | None,
        prefix: tuple[Tensor, Tensor] | None,
    ) -> Tensor:
        """mask: [B, 1, S, T] bool or None (plain causal); for a sliding layer, already windowed."""
        B, S, _ = x.shape
        q, k, v = self.project(x, adapter_ids)
        q = q.view(B, S, self.n_heads, self.head_dim)
        k = k.view(B, S, self.n_kv, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # q: [B, H, S, D], k: [B, Hkv, S, D]
        v = v.view(B, S, self.n_kv, self.head_dim).transpose(1, 2)  # [B, Hkv, S, D]
        q, k = apply_rope(q, k, cos, sin)  # cos/sin: [B, 1, S, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, T, D], T = everything cached so far + S
        elif prefix is not None:
            pk, pv = prefix  # [B, Hkv, P, D]: learned keys/values, positions before the first token
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        if self.softcap is None and mask is None and k.shape[2] == S:
            y = causal_attention(q, k, v, self.scale)  # [B, H, S, D]
        elif self.softcap is None:
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=mask is None and k.shape[2] == S, scale=self.scale,
                enable_gqa=self.n_kv != self.n_heads,
            )  # [B, H, S, D]
        else:
            y = softcapped_attention(q, k, v, mask, self.scale, self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1), adapter_ids)


def softcapped_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float | None,
                         cap: float) -> Tensor:
    """softmax(cap * tanh(q k^T * scale / cap)) v (Gemma 2): SDPA cannot cap scores, so written out.

    q: [B, H, S, D], k/v: [B, Hkv, T, D], mask: [B, 1, S, T] bool or None (causal) -> [B, H, S, D]."""
    H, Hkv, S, T = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    if Hkv != H:
        k, v = k.repeat_interleave(H // Hkv, dim=1), v.repeat_interleave(H // Hkv, dim=1)  # [B, H, T, D]
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)  # [B, H, S, T]
    scores = torch.tanh(scores / cap) * cap
    if mask is None:
        mask = torch.ones(S, T, dtype=torch.bool, device=q.device).tril(T - S)[None, None]
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(-1, dtype=torch.float32).to(q.dtype) @ v
