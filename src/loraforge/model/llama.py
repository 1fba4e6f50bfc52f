"""A Llama-family decoder in plain PyTorch, with Hugging Face's module names.

Why our own model rather than transformers' classes: adapter ids, prefixes and the KV cache are explicit
arguments of ``forward`` here, so a mixed batch (one adapter per row) needs no hooks or globals, the
serving engine owns its cache layout, and the training loss never materialises [tokens x vocab] logits.
Module and parameter names match ``LlamaForCausalLM`` exactly (``model.layers.0.self_attn.q_proj``), so
Hugging Face checkpoints load with ``load_state_dict`` and PEFT adapter keys map 1:1.

Every projection is called as ``proj(x, adapter_ids)``: the plain ``Linear`` ignores the ids, a LoRA
wrapper uses them. ``adapter_ids`` is a [B] long tensor of per-row adapter indices (-1 = base) or None.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops import RecomputeSaved, apply_rope, frozen_linear, rms_norm, silu_mul
from .cache import KVCache
from .config import ModelConfig
from .loss import chunked_cross_entropy


class Linear(nn.Linear):
    """nn.Linear that accepts (and ignores) the per-row adapter ids every projection is called with."""

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:  # noqa: ARG002
        return frozen_linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


def rope_inv_freq(cfg: ModelConfig) -> Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq.float()
    if sc["rope_type"] == "linear":
        return (inv_freq / float(sc["factor"])).float()
    # llama3: long wavelengths are divided by `factor`, short ones kept, a smooth ramp between.
    factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx = float(sc["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    scaled = torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    return scaled.float()


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        h = cfg.hidden_size
        self.q_proj = Linear(h, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = Linear(h, self.n_kv * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, h, bias=cfg.o_bias)

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
        B, S, _ = x.shape
        q = self.q_proj(x, adapter_ids).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x, adapter_ids).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x, adapter_ids).view(B, S, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)  # q: [B, H, S, D], k/v: [B, Hkv, S, D]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, T, D], T = everything cached so far + S
        elif prefix is not None:
            pk, pv = prefix  # [B, Hkv, P, D]: learned keys/values, positions before the first token
            k, v = torch.cat([pk.to(k.dtype), k], dim=2), torch.cat([pv.to(v.dtype), v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and k.shape[2] == S, enable_gqa=self.n_kv != self.n_heads
        )  # [B, H, S, D]
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1), adapter_ids)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, adapter_ids: Tensor | None, recompute: bool = False) -> Tensor:
        gate, up = self.gate_proj(x, adapter_ids), self.up_proj(x, adapter_ids)  # [B, S, I]
        h = silu_mul(gate, up)
        if not recompute:
            return self.down_proj(h, adapter_ids)
        # down_proj keeps its input for the adapter's gradient; rebuild it from gate and up instead
        with RecomputeSaved(h, lambda: silu_mul(gate, up)):
            return self.down_proj(h, adapter_ids)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, adapter_ids, cache, prefix, recompute: bool = False):
        """recompute: rebuild the norms' outputs and the MLP's hidden product in backward instead of
        keeping them (training without activation checkpointing; see RecomputeSaved)."""
        # The residual adds go into the block's output buffer, which nothing saves: a fresh sum would
        # leave that buffer as a freed hole in the heap each time (attn + x == x + attn bit for bit).
        if not recompute:
            x = self.self_attn(self.input_layernorm(x), cos, sin, mask, adapter_ids, cache, prefix).add_(x)
            return self.mlp(self.post_attention_layernorm(x), adapter_ids).add_(x)
        h = self.input_layernorm(x)
        with RecomputeSaved(h, lambda x=x: self.input_layernorm(x)):  # q/k/v keep their input for the adapters
            x = self.self_attn(h, cos, sin, mask, adapter_ids, cache, prefix).add_(x)
        h = self.post_attention_layernorm(x)
        with RecomputeSaved(h, lambda x=x: self.post_attention_layernorm(x)):
            return self.mlp(h, adapter_ids, recompute=True).add_(x)


class Backbone(nn.Module):
    """The `model.` part of LlamaForCausalLM: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.gradient_checkpointing = False

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [B, S] -> cos/sin: [B, 1, S, D]
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(
        self,
        input_ids: Tensor,
        *,
        positions: Tensor | None = None,
        attention_mask: Tensor | None = None,
        adapter_ids: Tensor | None = None,
        cache: KVCache | None = None,
        prefix: list[tuple[Tensor, Tensor]] | None = None,
        labels: Tensor | None = None,
        logits_to_keep: int = 0,
        logits_at: Tensor | None = None,
    ) -> Tensor:
        """Run the decoder.

        input_ids: [B, S]. positions: [B, S] (default: continue after the cache or prefix).
        attention_mask: [B, 1, S, T] bool (True = may attend), T = keys including cache/prefix; default
        causal, or taken from the cache's key mask. prefix: per-layer (k, v) [B, Hkv, P, D] prepended as
        past keys when there is no cache (with a cache, put the prefix into the cache instead).
        labels: [B, S] with -100 for ignored tokens; when given, returns the mean next-token loss (a
        scalar) computed in chunks, never the full logits. logits_to_keep: only the last N positions'
        logits (0 = all).
        """
        B, S = input_ids.shape
        training = self.training and torch.is_grad_enabled()
        past = cache.length if cache is not None else (prefix[0][0].shape[2] if prefix else 0)
        if positions is None:
            positions = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rope(positions, x.dtype)
        mask = attention_mask
        if mask is None and cache is not None:
            mask = cache.attention_mask(S)  # [B, 1, S, T] or None when plain causal suffices
        elif mask is None and prefix is not None:
            mask = causal_mask(S, past, x.device).expand(B, 1, S, past + S)
        for i, layer in enumerate(self.model.layers):
            p = prefix[i] if (prefix is not None and cache is None) else None
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, mask, adapter_ids, cache, p, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, adapter_ids, cache, p, recompute=training)
        if cache is not None:
            cache.advance(S)
        x = self.model.norm(x)
        if labels is not None:
            return chunked_cross_entropy(x, self.lm_head, labels, adapter_ids)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # [B, 1, H]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        if type(self.lm_head) is Linear:  # logits are only read: no copy out of the few-token GEMM form
            return frozen_linear(x, self.lm_head.weight, self.lm_head.bias, contiguous=False)
        return self.lm_head(x, adapter_ids)


def causal_mask(S: int, past: int, device) -> Tensor:
    """[1, 1, S, past + S] bool: query i (absolute position past + i) sees keys 0 .. past + i."""
    q = torch.arange(S, device=device)[:, None] + past
    k = torch.arange(past + S, device=device)[None, :]
    return (k <= q)[None, None]
