"""The gated MLP activation silu(gate) * up (SwiGLU, Shazeer 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .compiled import compiled_kernels, kernel
from .switch import reference_ops


def silu_mul_ref(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


def silu_mul(gate: Tensor, up: Tensor) -> Tensor:
    if reference_ops():
        return silu_mul_ref(gate, up)
    return _SiluMulFn.apply(gate, up, compiled_kernels(gate))


@kernel
def _forward_kernel(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up


@kernel
def _backward_kernel(gate: Tensor, up: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """(d gate, d up): silu'(z) = s (1 + z (1 - s)), s = sigmoid(z), in fp32."""
    z = gate.float()
    s = torch.sigmoid(z)
    gf = g.float()
    d_gate = gf * up.float() * s * (1.0 + z * (1.0 - s))
    return d_gate.to(gate.dtype), (gf * z * s).to(up.dtype)


class _SiluMulFn(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only: silu(gate) is recomputed in backward (one cheap pass)
    rather than kept alive, one [B, S, intermediate] tensor less per layer."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, compiled: bool) -> Tensor:
        ctx.save_for_backward(gate, up)
        ctx.compiled = compiled
        if compiled:
            return _forward_kernel(gate, up)
        out = F.silu(gate)
        return out.mul_(up) if out.dtype == torch.promote_types(gate.dtype, up.dtype) else out * up

    @staticmethod
    def backward(ctx, g: Tensor):
        gate, up = ctx.saved_tensors
        if ctx.compiled:
            d_gate, d_up = _backward_kernel(gate, up, g)
            return d_gate, d_up, None
        d_up = None
        if ctx.needs_input_grad[1]:
            d_up = F.silu(gate)
            d_up = (d_up.mul_(g) if d_up.dtype == g.dtype else d_up * g).to(up.dtype)
        d_gate = None
        if ctx.needs_input_grad[0]:
            gg = (g * up).to(gate.dtype)
            d_gate = torch.ops.aten.silu_backward(gg, gate)
        return d_gate, d_up, None
