"""A preallocated KV cache for a batch of sequences that advance together (gpt-fast style).

Left padding is handled with a per-row key mask: padded slots are never attended to. Used by
`generate_ids`; the serving engine, whose rows start and end at different times, keeps a slot per request
in `serve.cache.SlotCache` instead.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(self, n_layers: int, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        # k/v: [L, B, Hkv, T_max, D]
        self.k = torch.zeros(n_layers, batch, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.key_mask = torch.ones(batch, max_len, dtype=torch.bool, device=device)  # False = padding slot
        self.length = 0
        self.max_len = max_len

    @classmethod
    def for_model(cls, model, batch: int, max_len: int, dtype=None, device=None) -> KVCache:
        cfg = model.config
        p = next(model.parameters())
        return cls(cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim,
                   dtype or p.dtype if p.is_floating_point() else torch.float32, device or p.device)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        S = k.shape[2]
        end = self.length + S
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions > {self.max_len}")
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def attention_mask(self, S: int) -> Tensor | None:
        """[B, 1, S, T] bool for S new queries after `length` cached keys; None when plain causal is exact."""
        T = self.length + S
        keys = self.key_mask[:, :T]
        if self.length == 0 and bool(keys.all()):
            return None
        q = torch.arange(S, device=keys.device)[:, None] + self.length
        causal = torch.arange(T, device=keys.device)[None, :] <= q  # [S, T]
        return causal[None, None] & keys[:, None, None, :]
