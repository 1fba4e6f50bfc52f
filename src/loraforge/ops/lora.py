"""The LoRA projection over a frozen base (Hu et al. 2021): y = x W^T + b + s * B(A(dropout(x))).

`xd` is dropout(x), computed by the caller (it is x itself at p = 0 or in eval). Products run in the
compute dtype (autocast's, else x's): a bf16 base with fp32 master A and B runs its products in bf16 and
hands fp32 gradients back to A and B. B @ A is never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .switch import compute_dtype, reference_ops

Dequant = Callable[[torch.dtype], Tensor]


def lora_linear_ref(
    x: Tensor, xd: Tensor, W: Tensor | None, b: Tensor | None, A: Tensor, B: Tensor, s: float,
    dequant: Dequant | None = None,
) -> Tensor:
    dt = compute_dtype(x)
    Wd = (W if W is not None else dequant(dt)).to(dt)
    base = F.linear(x.to(dt), Wd, None if b is None else b.to(dt))
    return base + s * F.linear(F.linear(xd.to(dt), A.to(dt)), B.to(dt))


def lora_linear(
    x: Tensor, xd: Tensor, W: Tensor | None, b: Tensor | None, A: Tensor, B: Tensor, s: float,
    dequant: Dequant | None = None,
) -> Tensor:
    """The fused form of lora_linear_ref. W is None for a quantized base: `dequant(dtype)` gives it."""
    if reference_ops():
        return lora_linear_ref(x, xd, W, b, A, B, s, dequant)
    return _FrozenBaseLora.apply(x, None if xd is x else xd, W, b, A, B, s, dequant)


class _FrozenBaseLora(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T for a frozen W, as two GEMMs and one accumulating GEMM.

    The same expression through autograd materialises B(A xd), its scaled copy and the sum ([T, out]
    each, forward) and adds two [T, in] input gradients (backward); here the low-rank term is added
    into the base output by addmm_ and, without dropout, into the base input gradient by addmm_. Only x
    (and xd with dropout) and the small h = xd A^T [T, r] are saved; W is never given a gradient. A
    quantized base passes W = None and a `dequant` callable instead, called again in backward rather
    than keeping the dense W alive. xd = None means xd is x (no dropout).
    """

    @staticmethod
    def forward(ctx, x, xd, W, b, A, B, s, dequant):
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # [T, in]
            xd2 = x2 if xd is None else xd.reshape(-1, xd.shape[-1]).to(dt)
            Wd = (W if W is not None else dequant(dt)).to(dt)  # [out, in]
            Ac, Bc = A.to(dt), B.to(dt)  # [r, in], [out, r]: no copy when already dt
            # written through a 2-D alias so that the output is not a view (callers may add into it in place)
            out = x2.new_empty(*x.shape[:-1], Wd.shape[0])  # [*, out]
            out2 = out.view(-1, Wd.shape[0])  # [T, out]
            if b is None:
                torch.mm(x2, Wd.t(), out=out2)
            else:
                torch.addmm(b.to(dt), x2, Wd.t(), out=out2)
            del Wd
            h = xd2 @ Ac.t()  # [T, r]
            out2.addmm_(h, Bc.t(), alpha=s)
        ctx.save_for_backward(x2, None if xd is None else xd2, W, Ac, Bc, h)
        ctx.s, ctx.x_shape, ctx.dequant, ctx.dt = s, x.shape, dequant, dt
        ctx.dtypes = (x.dtype, None if xd is None else xd.dtype, A.dtype, B.dtype)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, xd2, W, A, B, h = ctx.saved_tensors
        dt, (x_dt, xd_dt, a_dt, b_dt) = ctx.dt, ctx.dtypes
        dx = dxd = dA = dB = None
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, g.shape[-1]).to(dt)  # [T, out]
            gh = (g2 @ B).mul_(ctx.s)  # [T, r]: d loss / d h
            if ctx.needs_input_grad[0]:
                Wd = (W if W is not None else ctx.dequant(dt)).to(dt)
                dx = g2 @ Wd  # [T, in]
                if xd2 is None:  # no dropout: the low-rank input gradient joins the base one
                    dx.addmm_(gh, A)
                dx = dx.view(ctx.x_shape).to(x_dt)
            if xd2 is not None and ctx.needs_input_grad[1]:
                dxd = (gh @ A).view(ctx.x_shape).to(xd_dt)  # [*, in], through dropout's own backward
            if ctx.needs_input_grad[4]:
                dA = (gh.t() @ (x2 if xd2 is None else xd2)).to(a_dt)  # [r, in]
            if ctx.needs_input_grad[5]:
                dB = (g2.t() @ h).mul_(ctx.s).to(b_dt)  # [out, r]
        return dx, dxd, None, None, dA, dB, None, None
