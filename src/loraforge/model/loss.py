"""Next-token cross-entropy fused with the output head, in chunks.

SmolLM2's vocabulary is 49,152: a batch of 4 x 256 tokens would hold 200 MB of fp32 logits, and their
log-softmax and gradient as much again each. We never hold more than one chunk of logits.

A frozen head (LoRA and QLoRA) goes through ops.frozen_head_ce, which computes the gradient with
respect to the hidden states in the forward pass. A trainable head (LoRA on lm_head, or full
fine-tuning) takes the checkpointed path, which lets autograd produce the head's own gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..ops import IGNORE_INDEX, frozen_head_ce

CHUNK_TOKENS = 256  # 256 x 49,152 fp32 logits = 50 MB; smaller chunks than this make the head matmul slower


def _chunk_loss_sum(h: Tensor, head: nn.Module, y: Tensor, ids: Tensor | None) -> Tensor:
    logits = head(h, ids).float()  # [N, V]; loss in fp32 whatever the compute dtype
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def _frozen_linear(head: nn.Module) -> bool:
    """True when `head` is a plain linear layer with no trainable parameter (no adapter, no grad)."""
    return isinstance(head, nn.Linear) and not any(p.requires_grad for p in head.parameters())


def chunked_cross_entropy(
    hidden: Tensor, head: nn.Module, labels: Tensor, adapter_ids: Tensor | None = None, chunk: int | None = None
) -> Tensor:
    """Mean loss of predicting labels[:, t+1] from hidden[:, t]. hidden: [B, S, H], labels: [B, S]."""
    chunk = chunk or CHUNK_TOKENS
    B, S, H = hidden.shape
    h = hidden[:, :-1]  # [B, S-1, H]
    y = labels[:, 1:]  # [B, S-1]
    if adapter_ids is not None and not _frozen_linear(head):  # a LoRA head needs each token's row adapter
        ids = adapter_ids[:, None].expand(B, S - 1).reshape(-1)
    else:
        ids = None
    h, y = h.reshape(-1, H), y.reshape(-1)
    keep = y != IGNORE_INDEX
    n = keep.sum()
    if ids is None:  # drop ignored tokens before the head: prompts and padding cost nothing
        h, y = h[keep], y[keep]
    if _frozen_linear(head):
        return frozen_head_ce(h, head.weight, head.bias, y, chunk) / n.clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hs, ys = h[s:s + chunk], y[s:s + chunk]
        i = ids[s:s + chunk] if ids is not None else None
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hs, head, ys, i, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, head, ys, i)
    return total / n.clamp(min=1)
