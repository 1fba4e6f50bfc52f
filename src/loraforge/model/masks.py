"""Attention masks: causal, and causal restricted to a sliding window.

Masks are [B, 1, S, T] bool (True = may attend) over key *slots*: T counts every key the layer sees
(prefix, cached and new), in the order they were written. Sliding windows are counted in slots too, as
transformers counts them in cache positions: with left padding, packed rows or a prefix, each example's
tokens are contiguous in slots, so a window of W slots is W of its tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor


def causal_mask(S: int, past: int, device) -> Tensor:
    """[1, 1, S, past + S] bool: query i (absolute position past + i) sees keys 0 .. past + i."""
    q = torch.arange(S, device=device)[:, None] + past
    k = torch.arange(past + S, device=device)[None, :]
    return (k <= q)[None, None]


def sliding_window_mask(mask: Tensor | None, S: int, T: int, window: int, device) -> Tensor:
    """`mask` (None = causal over T keys, the last S of them new) keeping only each query's `window` latest
    key slots: its own and the window - 1 before it (transformers' `kv_idx > q_idx - window`).

    A query's own slot is the last key its mask lets it see (attention is causal, and every query sees
    itself), which holds for all our mask makers: KVCache, the serving engine's prefill and decode views,
    prefix tuning and packed rows. That way no cache view needs to know about windows.
    """
    if mask is None:
        mask = causal_mask(S, T - S, device)  # [1, 1, S, T]
    k = torch.arange(mask.shape[-1], device=device)  # [T]
    own = torch.where(mask, k, -1).amax(-1, keepdim=True)  # [B, 1, S, 1]: each query's own slot
    return mask & (k > own - window)
