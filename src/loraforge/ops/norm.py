"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), normalised in fp32 whatever the input dtype."""

from __future__ import annotations

import torch
from torch import Tensor

from .compiled import compiled_kernels, kernel
from .switch import reference_ops


def rms_norm_ref(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Hugging Face's LlamaRMSNorm: the variance in fp32 (bf16 loses too many bits), cast back, then
    scaled by the weight in the promoted dtype (so an fp32 weight under autocast gives fp32)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    if reference_ops():
        return rms_norm_ref(x, weight, eps)
    return _RMSNormFn.apply(x, weight, eps, compiled_kernels(x))


@kernel
def _forward_kernel(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(the reference's output, rstd [*, 1] fp32), one pass for the sum of squares and one for the output."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


@kernel
def _backward_kernel(x: Tensor, weight: Tensor, rstd: Tensor, g: Tensor, want_dw: bool):
    """(dx, dw or None) as _RMSNormFn.backward computes them."""
    xhat = x.float() * rstd
    dw = (g.float() * xhat.to(x.dtype).float()).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype) if want_dw else None
    gx = g.float() * weight.float()
    dot = (gx * xhat).sum(-1, keepdim=True) / x.shape[-1]
    return ((gx - xhat * dot) * rstd).to(x.dtype), dw


class _RMSNormFn(torch.autograd.Function):
    """RMSNorm with a hand-written backward: saves x and the [*, 1] scale, not autograd's chain of
    [*, H] intermediates, and takes ~4 passes over [*, H] in backward instead of ~8."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float, compiled: bool) -> Tensor:
        ctx.compiled = compiled
        if compiled:
            y, rstd = _forward_kernel(x, weight, eps)
            ctx.save_for_backward(x, weight, rstd)
            return y
        xf = x.float()
        if x.dtype == torch.float32:  # the reference's own ops: bit for bit equal (tests/test_ops.py)
            y = torch.pow(xf, 2)  # x^2, then overwritten by the output: one [*, H] buffer, not two
            rstd = torch.rsqrt(y.mean(-1, keepdim=True) + eps)  # [*, 1]
            y = torch.mul(xf, rstd, out=y).to(x.dtype)
        else:  # xf is a copy: sum x^2 in one fused reduction (no [*, H] x^2) and scale xf in place
            ss = torch.linalg.vector_norm(xf, 2, -1, keepdim=True).square_()  # [*, 1] sum of x^2
            rstd = ss.div_(x.shape[-1]).add_(eps).rsqrt_()  # [*, 1]
            y = xf.mul_(rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y.mul_(weight) if weight.dtype == y.dtype else weight * y

    @staticmethod
    def backward(ctx, g: Tensor):
        x, weight, rstd = ctx.saved_tensors
        if ctx.compiled:
            dx, dw = _backward_kernel(x, weight, rstd, g, ctx.needs_input_grad[1])
            return dx, dw, None, None
        # fp32 copies of 16-bit x and g are scaled in place; fp32 ones (saved, or handed in) must not be
        xhat = x * rstd if x.dtype == torch.float32 else x.float().mul_(rstd)  # [*, H] fp32
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g.float() * xhat.to(x.dtype).float()).sum(dim=tuple(range(g.dim() - 1))).to(weight.dtype)
        gx = g * weight.float() if g.dtype == torch.float32 else g.float().mul_(weight)  # d loss / d xhat, fp32
        # d xhat_j / d x_i = rstd (delta_ij - xhat_i xhat_j / H)
        dot = (gx * xhat).sum(-1, keepdim=True).div_(x.shape[-1])  # [*, 1]
        dx = gx.sub_(xhat.mul_(dot)).mul_(rstd).to(x.dtype)
        return dx, dw, None, None
