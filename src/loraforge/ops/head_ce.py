"""Cross-entropy through a frozen output head, in chunks, with d/dh computed in the forward.

SmolLM2's vocabulary is 49,152: a batch of 4 x 256 tokens would hold 200 MB of fp32 logits, and their
log-softmax and gradient as much again each. With a frozen head (LoRA and QLoRA: the head is tied to
the frozen embedding) the gradient with respect to the hidden states is computed in the forward pass,
chunk by chunk, while the chunk's logits are at hand: softmax(logits) - onehot(label), times the head
weight. The backward then only scales that stored [tokens x hidden] gradient: two head matmuls per step
instead of the three of recomputing each chunk's logits in backward, and the softmax - onehot is written
back into the logits buffer, which the second matmul reads. The head product runs in the compute dtype;
the softmax and the loss in fp32, a few rows at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .switch import compute_dtype, reference_ops

IGNORE_INDEX = -100
# Rows of logits whose softmax is computed at once. Five passes (max, subtract, exp, sum, divide) over 8 rows
# held in cache, instead of over a whole [256, V] chunk in memory: 0.43x the CPU time for a chunk of bf16
# logits (V = 49,152, 1 thread, the same bits); 16 or 32 rows: 0.46x, 0.47x.
ROWS = 8


def _rows_ce(logits: Tensor, y: Tensor, scratch: Tensor | None, want_grad: bool) -> Tensor:
    """sum of -log_softmax(logits)_y over rows (fp32 []); with want_grad, logits are overwritten with
    softmax - onehot(y) (zero rows where y is IGNORE_INDEX). logits: [n, V] in any dtype; scratch: fp32
    [>= n, V] for the fp32 work when logits are not fp32 (None when they are)."""
    lg = logits if scratch is None else scratch[: logits.shape[0]].copy_(logits)  # [n, V] fp32
    valid = y != IGNORE_INDEX
    target = y.clamp(min=0)[:, None]  # [n, 1]
    picked = lg.gather(1, target)  # [n, 1], taken before lg is overwritten
    m = lg.amax(1, keepdim=True)
    z = lg.sub_(m).exp_().sum(1, keepdim=True)  # lg now holds exp(l - max)
    nll = (z.log() - (picked - m)).squeeze(1)  # [n] = -log_softmax(l)_y, rounded as F.cross_entropy
    all_valid = bool(valid.all())
    if want_grad:
        probs = lg.div_(z)  # softmax, in place
        probs.scatter_add_(1, target, torch.full_like(picked, -1.0))  # - onehot(y)
        if not all_valid:
            probs.mul_(valid[:, None])  # ignored rows contribute no gradient
        if probs is not logits:
            logits.copy_(probs)
    return nll.sum() if all_valid else nll.masked_fill(~valid, 0.0).sum()


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
            # the fp32 softmax of a few rows at a time, in a reused buffer (ROWS x V: 1.5 MB, in a core's
            # cache) when the logits are not fp32 themselves
            rows = hc.new_empty(min(ROWS, h.shape[0]), w.shape[0], dtype=torch.float32) if dt != torch.float32 else None
            for s in range(0, h.shape[0], chunk):
                hs, ys = hc[s:s + chunk], y[s:s + chunk]
                out = buf[: hs.shape[0]]
                logits = torch.mm(hs, w.t(), out=out) if b is None else torch.addmm(b, hs, w.t(), out=out)
                for r in range(0, logits.shape[0], ROWS):
                    total += _rows_ce(logits[r:r + ROWS], ys[r:r + ROWS], rows, want_grad)
                if want_grad:  # logits now hold softmax - onehot(y), in dt
                    torch.mm(logits, w, out=grad[s:s + chunk])  # [n, H], written in place
        ctx.save_for_backward(grad)
        ctx.h_dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, g: Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * g.to(grad.dtype)).to(ctx.h_dtype), None, None, None, None, None
