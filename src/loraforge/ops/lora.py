"""The LoRA projection over a frozen base (Hu et al. 2021): y = x W^T + b + s * B(A(dropout(x))).

Dropout is given as its mask: `keep` (0/1 from ops.dropout_mask, or bool; None = no dropout) and its
rate p, so the fused form keeps the mask for backward instead of a dropped-out copy of x. Products run in
the compute dtype (autocast's, else x's): a bf16 base with fp32 master A and B runs its products in bf16
and hands fp32 gradients back to A and B. B @ A is never formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .dropout import dropout_ref
from .switch import compute_dtype, reference_ops

Dequant = Callable[[torch.dtype], Tensor]


def lora_linear_ref(
    x: Tensor, W: Tensor | None, b: Tensor | None, A: Tensor, B: Tensor, s: float,
    keep: Tensor | None = None, p: float = 0.0, dequant: Dequant | None = None,
) -> Tensor:
    dt = compute_dtype(x)
    Wd = (W if W is not None else dequant(dt)).to(dt)
    base = F.linear(x.to(dt), Wd, None if b is None else b.to(dt))
    xd = x if keep is None else dropout_ref(x, keep, p)
    return base + s * F.linear(F.linear(xd.to(dt), A.to(dt)), B.to(dt))


def lora_linear(
    x: Tensor, W: Tensor | None, b: Tensor | None, A: Tensor, B: Tensor, s: float,
    keep: Tensor | None = None, p: float = 0.0, dequant: Dequant | None = None,
) -> Tensor:
    """The fused form of lora_linear_ref. W is None for a quantized base: `dequant(dtype)` gives it."""
    if reference_ops():
        return lora_linear_ref(x, W, b, A, B, s, keep, p, dequant)
    return _FrozenBaseLora.apply(x, W, b, A, B, s, keep, p, dequant)


class _FrozenBaseLora(torch.autograd.Function):
    """y = x W^T + b + s (xd A^T) B^T for a frozen W, xd = dropout(x), as two GEMMs and one accumulating GEMM.

    The same expression through autograd materialises B(A xd), its scaled copy and the sum ([T, out]
    each, forward) and adds two [T, in] input gradients (backward); here the low-rank term is added
    into the base output by addmm_ and, without dropout, into the base input gradient by addmm_. Only x,
    the 0/1 dropout mask (in the compute dtype) and the small h = (x * keep) A^T [T, r] are saved (xd is
    rebuilt from x and the mask); W is never given a gradient. Dropout's 1 / (1 - p) is not applied to
    the [T, in] input but folded into s, which scales only [T, r] and [out, r] products (or is a GEMM's
    alpha), so the mask stays exact 0/1 in bf16. A quantized base passes W = None and a `dequant`
    callable instead, called again in backward rather than keeping the dense W alive.
    """

    @staticmethod
    def forward(ctx, x, W, b, A, B, s, keep, p, dequant):
        dt = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            x2 = x.reshape(-1, x.shape[-1]).to(dt)  # [T, in]
            m2 = None if keep is None else keep.reshape(x2.shape).to(dt)  # [T, in] 0/1; no copy when dt
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
            s = s if m2 is None else s / (1.0 - p)  # dropout's scale, on the low-rank side
            h = (x2 if m2 is None else x2 * m2) @ Ac.t()  # [T, r]
            out2.addmm_(h, Bc.t(), alpha=s)
        ctx.save_for_backward(x2, m2, W, Ac, Bc, h)
        ctx.s, ctx.x_shape, ctx.dequant, ctx.dt = s, x.shape, dequant, dt
        ctx.dtypes = (x.dtype, A.dtype, B.dtype)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, m2, W, A, B, h = ctx.saved_tensors
        dt, (x_dt, a_dt, b_dt) = ctx.dt, ctx.dtypes
        dx = dA = dB = None
        with torch.autocast(g.device.type, enabled=False):
            g2 = g.reshape(-1, g.shape[-1]).to(dt)  # [T, out]
            gh = (g2 @ B).mul_(ctx.s)  # [T, r]: d loss / d h
            if ctx.needs_input_grad[0]:
                Wd = (W if W is not None else ctx.dequant(dt)).to(dt)
                dx = g2 @ Wd  # [T, in]
                if m2 is None:  # no dropout: the low-rank input gradient joins the base one
                    dx.addmm_(gh, A)
                else:  # through the mask: d xd / d x = keep (its 1 / (1 - p) is in s)
                    dx.addcmul_(gh @ A, m2)
                dx = dx.view(ctx.x_shape).to(x_dt)
            if ctx.needs_input_grad[3]:
                xd2 = x2 if m2 is None else x2 * m2
                dA = (gh.t() @ xd2).to(a_dt)  # [r, in]
            if ctx.needs_input_grad[4]:
                dB = (g2.t() @ h).mul_(ctx.s).to(b_dt)  # [out, r]
        return dx, None, None, dA, dB, None, None, None, None
