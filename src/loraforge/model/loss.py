"""Next-token cross-entropy fused with the output head, in chunks.

SmolLM2's vocabulary is 49,152: a batch of 4 x 256 tokens would hold 200 MB of fp32 logits, and their
log-softmax and gradient as much again each. We never hold more than one chunk of logits.

With a frozen head (LoRA and QLoRA: the head is tied to the frozen embedding) the gradient with respect
to the hidden states is computed in the forward pass, chunk by chunk, while the chunk's logits are at
hand: softmax(logits) - onehot(label), times the head weight. The backward then only scales that
stored [tokens x hidden] gradient. This costs two head matmuls per step instead of the three of
recomputing each chunk's logits in backward (activation checkpointing), and the softmax is done in
place in the logits buffer. A trainable head (LoRA on lm_head, or full fine-tuning) takes the
checkpointed path, which lets autograd produce the head's own gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # 256 x 49,152 fp32 logits = 50 MB; smaller chunks than this make the head matmul slower


def _chunk_loss_sum(h: Tensor, head: nn.Module, y: Tensor, ids: Tensor | None) -> Tensor:
    logits = head(h, ids).float()  # [N, V]; loss in fp32 whatever the compute dtype
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


class _FrozenHeadCE(torch.autograd.Function):
    """sum_t CE(h_t W^T + b, y_t) for a frozen head; d/dh is computed in forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int, want_grad: bool):
        # h: [N, H], weight: [V, H], bias: [V] or None, y: [N] (IGNORE_INDEX rows add nothing)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h) if want_grad else None  # [N, H]
        # one logits buffer for all chunks: a fresh one per chunk would briefly hold two
        buf = h.new_empty(min(chunk, h.shape[0]), weight.shape[0])  # [chunk, V]
        for s in range(0, h.shape[0], chunk):
            hs, ys = h[s:s + chunk], y[s:s + chunk]
            out = buf[: hs.shape[0]]
            logits = torch.mm(hs, weight.t(), out=out) if bias is None else torch.addmm(bias, hs, weight.t(), out=out)
            logits = logits.float()  # [n, V]; a no-op in fp32
            valid = ys != IGNORE_INDEX
            target = ys.clamp(min=0)[:, None]  # [n, 1]
            picked = logits.gather(1, target)  # [n, 1], taken before the buffer is overwritten
            m = logits.amax(1, keepdim=True)
            z = logits.sub_(m).exp_().sum(1, keepdim=True)  # logits now hold exp(l - max)
            nll = (z.log() - (picked - m)).squeeze(1)  # [n] = -log_softmax(l)_y, rounded as F.cross_entropy
            all_valid = bool(valid.all())
            total += nll.sum() if all_valid else nll.masked_fill(~valid, 0.0).sum()
            if want_grad:
                probs = logits.div_(z)  # softmax, in place
                probs.scatter_add_(1, target, torch.full_like(picked, -1.0))  # - onehot(y)
                if not all_valid:
                    probs.mul_(valid[:, None])  # ignored rows contribute no gradient
                if probs.dtype == weight.dtype == h.dtype:
                    torch.mm(probs, weight, out=grad[s:s + chunk])  # [n, H], written in place
                else:
                    grad[s:s + chunk] = (probs.to(weight.dtype) @ weight).to(h.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * g.to(grad.dtype), None, None, None, None, None


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
        want_grad = torch.is_grad_enabled() and h.requires_grad
        total = _FrozenHeadCE.apply(h, head.weight, head.bias, y, chunk, want_grad)
        return total / n.clamp(min=1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for s in range(0, h.shape[0], chunk):
        hs, ys = h[s:s + chunk], y[s:s + chunk]
        i = ids[s:s + chunk] if ids is not None else None
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss_sum, hs, head, ys, i, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(hs, head, ys, i)
    return total / n.clamp(min=1)
