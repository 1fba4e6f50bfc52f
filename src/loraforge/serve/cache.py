"""A fixed pool of KV-cache slots, one per running sequence, for continuous batching.

Storage is ``k, v: [L, slots, Hkv, T_max, D]`` and each slot has its own length. Running sequences always
occupy slots ``0 .. n-1`` (a leaving sequence's slot is refilled by moving the last one into it), so a
decode step reads ``k[layer, :n, :, :T]``, a view, instead of gathering rows every layer.

The model talks to a cache through ``update(layer, k, v)``, ``length``, ``advance(S)`` and
``attention_mask(S)``; ``prefill_view`` and ``decode_view`` return small objects with that interface for
one forward: a prefill writes one sequence into its own slot, a decode step appends one token to every
running slot at its own position. A prefix adapter's keys and values are the first P positions of its row's
slot (``write_prefix``); the prompt follows them (``prefill_view(..., past=P)``) and decoding needs nothing
more, since every row already reads its own slot up to its own length.

Isolation: a decode step reads every running slot up to the longest row, so a row's keys and values past
its own length are read too, behind a mask. A masked weight of 0 times a stale NaN or infinity (left by an
earlier occupant whose adapter produced them) is NaN, so a slot never shows another request's values: the
positions a new occupant does not overwrite are zeroed when it takes the slot (`written` tracks how far
each slot holds data).
"""

from __future__ import annotations

import torch
from torch import Tensor


class SlotCache:
    def __init__(self, n_layers: int, slots: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        # k/v: [L, slots, Hkv, T_max, D]
        self.k = torch.zeros(n_layers, slots, n_kv, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        self.lengths = [0] * slots  # cached positions per slot
        self.written = [0] * slots  # positions of each slot that may hold values (padding and past occupants)
        self.slots, self.max_len = slots, max_len

    @classmethod
    def for_model(cls, model, slots: int, max_len: int) -> SlotCache:
        cfg = model.config
        emb = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, max_len, cfg.head_dim, emb.dtype, emb.device)

    def move(self, src: int, dst: int) -> None:
        """Copy slot `src`'s cached positions into slot `dst` (to keep running slots contiguous)."""
        n = self.lengths[src]
        self.k[:, dst, :, :n] = self.k[:, src, :, :n]
        self.v[:, dst, :, :n] = self.v[:, src, :, :n]
        self._clear(dst, n)
        self.lengths[dst] = n

    def _clear(self, slot: int, start: int) -> None:
        """Zero `slot` from position `start` to the end of what it holds (a past occupant's values)."""
        end = self.written[slot]
        if end > start:
            self.k[:, slot, :, start:end] = 0
            self.v[:, slot, :, start:end] = 0
        self.written[slot] = start

    def write_prefix(self, slot: int, prefix: list[tuple[Tensor, Tensor]]) -> None:
        """Put a prefix adapter's per-layer (k, v) [1, Hkv, P, D] into positions 0 .. P-1 of `slot`."""
        P = prefix[0][0].shape[2]
        for layer, (k, v) in enumerate(prefix):
            self.k[layer, slot, :, :P] = k[0]
            self.v[layer, slot, :, :P] = v[0]
        self.written[slot] = max(self.written[slot], P)

    def prefill_view(self, slot: int, lengths: list[int], past: int = 0) -> _PrefillView:
        """Prompts of `lengths` tokens, right-padded into one batch, written into slots slot, slot + 1, ...
        past > 0: one prompt after the `past` positions already in its slot (a prefix)."""
        if slot + len(lengths) > self.slots or past + max(lengths) > self.max_len or (past and len(lengths) > 1):
            raise ValueError(f"prefill of {len(lengths)} prompts (longest {max(lengths)}, after {past}) at slot "
                             f"{slot} does not fit {self.slots} slots of {self.max_len} positions")
        for i in range(len(lengths)):
            self.lengths[slot + i] = 0
            self._clear(slot + i, past + max(lengths))  # positions below that are all (over)written
        return _PrefillView(self, slot, lengths, past)

    def decode_view(self, n: int) -> _DecodeView:
        return _DecodeView(self, n)


class _PrefillView:
    """Prompts written into consecutive slots from position `past` (0, or one row after its prefix): a
    batch of rows right-padded to the longest.

    Every row's keys, padding included, land in its slot; the padding's are stale past the row's length
    and the decode mask never shows them (the first decode step overwrites the first of them)."""

    def __init__(self, cache: SlotCache, slot: int, lengths: list[int], past: int = 0):
        self.c, self.slot, self.lengths, self.past = cache, slot, lengths, past
        self.length = past

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k/v: [n, Hkv, S, D]; returned: [n, Hkv, past + S, D] (the prefix, then these)
        n, S, s, P = k.shape[0], k.shape[2], self.slot, self.past
        self.c.k[layer, s:s + n, :, P:P + S] = k
        self.c.v[layer, s:s + n, :, P:P + S] = v
        if P:
            return self.c.k[layer, s:s + n, :, :P + S], self.c.v[layer, s:s + n, :, :P + S]
        return k, v

    def advance(self, n: int) -> None:  # noqa: ARG002 - each row advances by its own length
        for i, L in enumerate(self.lengths):
            self.c.lengths[self.slot + i] = self.past + L

    def attention_mask(self, S: int) -> Tensor | None:
        """None (plain causal) when no row is padded and nothing precedes; after a prefix, [1, 1, S, P + S]
        (every query sees the prefix, then causal); else [n, 1, S, S]: causal, and no padding keys. A
        padding query still sees its row's real keys, so no row of the mask is empty."""
        dev = self.c.k.device
        if self.past:  # one unpadded row
            t = torch.arange(self.past + S, device=dev)
            return (t[None, :] <= torch.arange(S, device=dev)[:, None] + self.past)[None, None]
        if all(L == S for L in self.lengths):
            return None
        t = torch.arange(S, device=dev)
        keys = t[None, :] < torch.tensor(self.lengths, device=dev)[:, None]  # [n, S]
        return (t[None, :] <= t[:, None])[None, None] & keys[:, None, None, :]

    def last_positions(self) -> Tensor:
        """[n]: each row's last prompt token, whose logits give its first new token."""
        return torch.tensor(self.lengths, device=self.c.k.device) - 1


class _DecodeView:
    """One new token for each of the running slots 0 .. n-1, each at its own position."""

    def __init__(self, cache: SlotCache, n: int):
        self.c, self.n = cache, n
        lengths = cache.lengths[:n]
        dev = cache.k.device
        self.pos = torch.tensor(lengths, dtype=torch.long, device=dev)  # [n]: where each new key goes
        self.rows = torch.arange(n, device=dev)
        self.T = max(lengths) + 1
        if self.T > cache.max_len:
            raise ValueError(f"KV cache slot full: {self.T} positions > {cache.max_len}")

    @property
    def length(self) -> int:
        return self.T - 1

    def positions(self) -> Tensor:
        return self.pos[:, None]  # [n, 1]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # k/v: [n, Hkv, 1, D] -> written at (slot b, position pos[b]); returns [n, Hkv, T, D] views
        self.c.k[layer, self.rows, :, self.pos] = k[:, :, 0]
        self.c.v[layer, self.rows, :, self.pos] = v[:, :, 0]
        return self.c.k[layer, : self.n, :, : self.T], self.c.v[layer, : self.n, :, : self.T]

    def advance(self, n: int) -> None:
        for b in range(self.n):
            self.c.lengths[b] += n
            self.c.written[b] = max(self.c.written[b], self.c.lengths[b])

    def attention_mask(self, S: int = 1) -> Tensor:  # noqa: ARG002 - always one query per row
        # [n, 1, 1, T] bool: row b sees its own keys 0 .. pos[b]; the rest of the slot is stale or empty
        return (torch.arange(self.T, device=self.pos.device)[None, :] <= self.pos[:, None])[:, None, None, :]
