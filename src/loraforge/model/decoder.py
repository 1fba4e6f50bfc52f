"""One decoder for every family in model/config.py's FAMILIES, in plain PyTorch, with transformers' module names.

Why our own model rather than transformers' classes: adapter ids, prefixes and the KV cache are explicit
arguments of ``forward`` here, so a mixed batch (one adapter per row) needs no hooks or globals, the
serving engine owns its cache layout, and the training loss never materialises [tokens x vocab] logits.
Module and parameter names match transformers' (``model.layers.0.self_attn.q_proj``), so checkpoints load
with ``load_state_dict`` and PEFT adapter keys map 1:1.

Every projection is called as ``proj(x, adapter_ids)``: the plain ``Linear`` ignores the ids, a LoRA
wrapper uses them. ``adapter_ids`` is a [B] long tensor of per-row adapter indices (-1 = base) or None.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops import RecomputeSaved, frozen_linear
from .attention import Attention
from .cache import KVCache
from .config import ModelConfig
from .linear import Linear
from .loss import chunked_cross_entropy
from .masks import causal_mask, sliding_window_mask
from .mlp import MLP, MoE
from .norm import RMSNorm
from .rope import cos_sin, inv_freq_and_scale

# Per norm placement, the transformers names of (attention input, attention output, MLP input, MLP output)
# norms; None where the family has none.
NORM_NAMES = {
    "pre": ("input_layernorm", None, "post_attention_layernorm", None),
    "sandwich": ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                 "post_feedforward_layernorm"),
    "post": (None, "post_attention_layernorm", None, "post_feedforward_layernorm"),
}


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg)
        self.norm_names = NORM_NAMES[cfg.norm_placement]
        for name in self.norm_names:
            if name is not None:
                self.add_module(name, RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset))

    def _norm(self, which: int, x: Tensor) -> Tensor:
        name = self.norm_names[which]
        return x if name is None else getattr(self, name)(x)

    def forward(self, x, cos, sin, mask, adapter_ids, cache, prefix, recompute: bool = False):
        """x: [B, S, hidden]. recompute: rebuild the input norms' outputs and the MLP's hidden product in
        backward instead of keeping them (training without activation checkpointing; see RecomputeSaved)."""
        # The residual adds go into the block's output buffer, which nothing saves: a fresh sum would
        # leave that buffer as a freed hole in the heap each time (attn + x == x + attn bit for bit).
        h = self._pre(0, x, recompute, lambda h: self.self_attn(h, cos, sin, mask, adapter_ids, cache, prefix))
        x = self._norm(1, h).add_(x)
        h = self._pre(2, x, recompute, lambda h: self.mlp(h, adapter_ids, recompute=recompute))
        return self._norm(3, h).add_(x)

    def _pre(self, which: int, x: Tensor, recompute: bool, block) -> Tensor:
        """block(norm(x)); when recomputing, the norm's output is rebuilt in backward for the projections
        that keep it (q/k/v, gate/up keep their input for the adapters' gradients)."""
        h = self._norm(which, x)
        if not recompute or self.norm_names[which] is None:
            return block(h)
        with RecomputeSaved(h, lambda x=x: self._norm(which, x)):
            return block(h)


class Backbone(nn.Module):
    """The `model.` part of transformers' *ForCausalLM: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_unit_offset)


class SoftcappedHead(nn.Module):
    """The output head with Gemma 2's final soft-capping: cap * tanh(logits / cap). Used by the loss, which
    then takes its generic (checkpointed) path: the fused frozen-head loss has no cap."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        return torch.tanh(self.head(x, adapter_ids) / self.cap) * self.cap


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_rope()
        self.gradient_checkpointing = False

    def init_rope(self, device=None) -> None:
        """(Re)build the rotary tables: buffers built on the meta device hold no data."""
        cfg = self.config
        inv_freq, self.rope_scale = inv_freq_and_scale(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        self.register_buffer("inv_freq", inv_freq.to(device), persistent=False)
        self.local_rope = cfg.rope_local is not None
        if self.local_rope:
            inv, self.local_rope_scale = inv_freq_and_scale(cfg.rope_local, cfg.head_dim, cfg.max_position_embeddings)
            self.register_buffer("inv_freq_local", inv.to(device), persistent=False)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # positions: [B, S] -> cos/sin: [B, 1, S, D]
        return cos_sin(self.inv_freq, self.rope_scale, positions, dtype)

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
        causal, or taken from the cache's key mask. Sliding-window layers narrow it themselves.
        prefix: per-layer (k, v) [B, Hkv, P, D] prepended as past keys when there is no cache (with a
        cache, put the prefix into the cache instead). labels: [B, S] with -100 for ignored tokens; when
        given, returns the mean next-token loss (a scalar) computed in chunks, never the full logits.
        logits_to_keep: only the last N positions' logits (0 = all). logits_at: [B] one position per row.
        """
        cfg = self.config
        B, S = input_ids.shape
        training = self.training and torch.is_grad_enabled()
        past = cache.length if cache is not None else (prefix[0][0].shape[2] if prefix else 0)
        if positions is None:
            positions = torch.arange(past, past + S, device=input_ids.device).expand(B, S)
        x = self.model.embed_tokens(input_ids)  # [B, S, hidden]
        if cfg.embed_scale:  # Gemma; the factor rounded to the compute dtype first, as transformers does
            x = x * torch.tensor(cfg.hidden_size**0.5, dtype=x.dtype)
        rope = {False: self.rope(positions, x.dtype)}
        if self.local_rope:
            rope[True] = cos_sin(self.inv_freq_local, self.local_rope_scale, positions, x.dtype)
        mask = attention_mask
        if mask is None and cache is not None:
            mask = cache.attention_mask(S)  # [B, 1, S, T] or None when plain causal suffices
        elif mask is None and prefix is not None:
            mask = causal_mask(S, past, x.device).expand(B, 1, S, past + S)
        masks = {None: mask}  # window -> that window's mask, made once per forward
        for w in set(cfg.layer_windows) - {None}:
            masks[w] = sliding_window_mask(mask, S, past + S, w, x.device)
        for i, layer in enumerate(self.model.layers):
            p = prefix[i] if (prefix is not None and cache is None) else None
            w = cfg.layer_windows[i]
            cos, sin = rope[self.local_rope and w is not None]
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, cos, sin, masks[w], adapter_ids, cache, p, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[w], adapter_ids, cache, p, recompute=training)
        if cache is not None:
            cache.advance(S)
        x = self.model.norm(x)
        head = self.lm_head if cfg.final_softcap is None else SoftcappedHead(self.lm_head, cfg.final_softcap)
        if labels is not None:
            return chunked_cross_entropy(x, head, labels, adapter_ids)
        if logits_at is not None:
            x = x[torch.arange(B, device=x.device), logits_at][:, None]  # [B, 1, H]
        elif logits_to_keep:
            x = x[:, -logits_to_keep:]
        if type(self.lm_head) is Linear and cfg.final_softcap is None:
            # logits are only read: no copy out of the few-token GEMM form
            return frozen_linear(x, self.lm_head.weight, self.lm_head.bias, contiguous=False)
        return head(x, adapter_ids)
