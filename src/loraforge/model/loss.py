"""Next-token cross-entropy fused with the output head, in chunks.

SmolLM2's vocabulary is 49,152: a batch of 4 x 256 tokens would hold 200 MB of fp32 logits, and their
gradient as much again. We compute the head and the loss one chunk of tokens at a time and recompute
each chunk's logits in backward (activation checkpointing), so at most one chunk of logits is alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_TOKENS = 1024


def _chunk_loss_sum(h: Tensor, head: nn.Module, y: Tensor, ids: Tensor | None) -> Tensor:
    logits = head(h, ids).float()  # [N, V]; loss in fp32 whatever the compute dtype
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy(
    hidden: Tensor, head: nn.Module, labels: Tensor, adapter_ids: Tensor | None = None, chunk: int = CHUNK_TOKENS
) -> Tensor:
    """Mean loss of predicting labels[:, t+1] from hidden[:, t]. hidden: [B, S, H], labels: [B, S]."""
    B, S, H = hidden.shape
    h = hidden[:, :-1]  # [B, S-1, H]
    y = labels[:, 1:]  # [B, S-1]
    if adapter_ids is not None:  # the head may be a LoRA layer that needs each token's row adapter
        ids = adapter_ids[:, None].expand(B, S - 1).reshape(-1)
    else:
        ids = None
    h, y = h.reshape(-1, H), y.reshape(-1)
    keep = y != IGNORE_INDEX
    n = keep.sum()
    if ids is None:  # drop ignored tokens before the head: prompts and padding cost nothing
        h, y = h[keep], y[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hs, ys = h[s:s + chunk], y[s:s + chunk]
        i = ids[s:s + chunk] if ids is not None else None
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hs, head, ys, i, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, head, ys, i)
    return total / n.clamp(min=1)
