"""Cross-entropy through a frozen output head, in chunks, with d/dh computed in the forward.

SmolLM2's vocabulary is 49,152: a batch of 4 x 256 tokens would hold 200 MB of fp32 logits, and their
log-softmax and gradient as much again each. With a frozen head (LoRA and QLoRA: the head is tied to
the frozen embedding) the gradient with respect to the hidden states is computed in the forward pass,
chunk by chunk, while the chunk's logits are at hand: softmax(logits) - onehot(label), times the head
weight. The backward then only scales that stored [tokens x hidden] gradient: two head matmuls per step
instead of the three of recomputing each chunk's logits in backward, and the softmax is done in place in
the logits buffer. The head product runs in the compute dtype; the softmax and the loss in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .switch import compute_dtype, reference_ops

IGNORE_INDEX = -100


def frozen_head_ce_ref(h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int = 0) -> Tensor:
    """sum_t CE(h_t W^T + b, y_t); h: [N, H], weight: [V, H], y: [N] (IGNORE_INDEX rows add nothing)."""
    logits = F.linear(h, weight, bias)  # [N, V]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # the loss in fp32 at least
    return F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")


def frozen_head_ce(h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int) -> Tensor:
    if reference_ops():
        return frozen_head_ce_ref(h, weight, bias, y)
    want_grad = torch.is_grad_enabled() and h.requires_grad
    return _FrozenHeadCE.apply(h, weight, bias, y, chunk, want_grad)


class _FrozenHeadCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, y: Tensor, chunk: int, want_grad: bool):
        # h: [N, H], weight: [V, H], bias: [V] or None, y: [N]
        dt = compute_dtype(h)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad = torch.empty_like(h, dtype=dt) if want_grad else None  # [N, H]
        with torch.autocast(h.device.type, enabled=False):
            hc, w = h.to(dt), weight.to(dt)
            b = None if bias is None else bias.to(dt)
            # one logits buffer for all chunks: a fresh one per chunk would briefly hold two
            buf = hc.new_empty(min(chunk, h.shape[0]), w.shape[0])  # [chunk, V]
            for s in range(0, h.shape[0], chunk):
                hs, ys = hc[s:s + chunk], y[s:s + chunk]
                out = buf[: hs.shape[0]]
                logits = torch.mm(hs, w.t(), out=out) if b is None else torch.addmm(b, hs, w.t(), out=out)
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
                    if probs.dtype == dt:
                        torch.mm(probs, w, out=grad[s:s + chunk])  # [n, H], written in place
                    else:
                        grad[s:s + chunk] = probs.to(dt) @ w
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).to(ctx.h_dtype), None, None, None, None, None
