"""The LoRA layer: a plain module that wraps a frozen base projection (composition, not inheritance).

    y = base(x) + s * B(A(dropout(x))),   A: [r, in], B: [out, r], s = alpha / r (or alpha / sqrt(r))

B(Ax) costs r * (in + out) per token; (BA)x would form an [out, in] matrix per step, so the forward
never multiplies B by A. Several named adapters live side by side; which one runs is decided by the
shared ``AdapterRegistry`` (a pointer switch) or, for a mixed batch, by the per-row ``adapter_ids``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.llama import Linear
from .registry import AdapterRegistry


class _FrozenBaseLora(torch.autograd.Function):
    """y = x W^T + b + s (x A^T) B^T for a frozen W, as two GEMMs and one accumulating GEMM.

    The same expression through autograd materialises B(Ax), its scaled copy and the sum ([T, out]
    each, forward) and adds two [T, in] input gradients (backward); here the low-rank term is added
    into the base output by addmm_ and into the base input gradient by addmm_. Only x and the small
    h = x A^T [T, r] are saved; W is never given a gradient. A quantized base passes W = None and a
    `dequant` callable instead, called again in backward rather than keeping the dense W alive.
    """

    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor | None, b: Tensor | None, A: Tensor, B: Tensor, s: float, dequant=None):
        x2 = x.reshape(-1, x.shape[-1])  # [T, in]
        Wd = W if W is not None else dequant()  # [out, in]
        # written through a 2-D alias so that the output is not a view (callers may add into it in place)
        out = x.new_empty(*x.shape[:-1], Wd.shape[0])  # [*, out]
        out2 = out.view(-1, Wd.shape[0])  # [T, out]
        if b is None:
            torch.mm(x2, Wd.t(), out=out2)
        else:
            torch.addmm(b, x2, Wd.t(), out=out2)
        del Wd
        h = x2 @ A.t()  # [T, r]
        out2.addmm_(h, B.t(), alpha=s)
        ctx.save_for_backward(x2, W, A, B, h)
        ctx.s, ctx.x_shape, ctx.dequant = s, x.shape, dequant
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        x2, W, A, B, h = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])  # [T, out]
        gh = (g2 @ B).mul_(ctx.s)  # [T, r]: d loss / d h
        dx = dA = dB = None
        if ctx.needs_input_grad[0]:
            Wd = W if W is not None else ctx.dequant()
            dx = (g2 @ Wd).addmm_(gh, A).view(ctx.x_shape)  # [T, in]
        if ctx.needs_input_grad[3]:
            dA = gh.t() @ x2  # [r, in]
        if ctx.needs_input_grad[4]:
            dB = (g2.t() @ h).mul_(ctx.s)  # [out, r]
        return dx, None, None, dA, dB, None, None


def _quantized(base: nn.Module) -> bool:
    """A frozen quantized linear (loraforge.quant.QuantLinear): it can hand out its weight dequantized."""
    return hasattr(base, "quant_type") and callable(getattr(base, "dequantize", None))


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, registry: AdapterRegistry):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.lora_A = nn.ParameterDict()  # name -> [r, in]
        self.lora_B = nn.ParameterDict()  # name -> [out, r]
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        # Not a submodule: one registry object is shared by every LoRA layer of the model.
        object.__setattr__(self, "registry", registry)
        self._stack_cache: tuple | None = None
        self._group_cache: tuple | None = None  # (stack, row adapter ids, plan) of the last mixed batch

    # -- adapters -----------------------------------------------------------------------------------------
    def add(self, name: str, r: int, scaling: float, dropout: float, init: str = "kaiming") -> None:
        w = self.base_weight_like()
        A = torch.empty(r, self.in_features, dtype=w.dtype, device=w.device)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:  # Kaiming-uniform, as nn.Linear initialises its own weight
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(self.out_features, r, dtype=w.dtype, device=w.device))
        self.scaling[name] = scaling
        self.dropout[name] = dropout

    def remove(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)
        self._stack_cache = None
        self._group_cache = None

    def base_weight_like(self) -> Tensor:
        """A tensor with the dtype/device LoRA weights should have: the base's float weight, or for a
        quantized base (packed integer codes) an empty tensor in the dtype it computes in."""
        w = getattr(self.base, "weight", None)
        if w is not None and w.is_floating_point():
            return w
        # QuantLinear: compute_dtype is the load dtype (fp32 on CPU); weight_dtype is what it was quantized from
        dt = getattr(self.base, "compute_dtype", None) or getattr(self.base, "weight_dtype", None) or torch.float32
        dev = w.device if w is not None else next((b.device for b in self.base.buffers()), torch.device("cpu"))
        return torch.empty(0, dtype=dt, device=dev)

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A, [out, in]: only for merging, never in the forward."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        if adapter_ids is None:
            name = self.registry.active
            if name is not None and name != self.registry.merged and name in self.lora_A and self._fusable(x, name):
                base, A, B, s = self.base, self.lora_A[name], self.lora_B[name], self.scaling[name]
                if _quantized(base):
                    return _FrozenBaseLora.apply(x, None, base.bias, A, B, s, lambda: base.dequantize(x.dtype))
                return _FrozenBaseLora.apply(x, base.weight, base.bias, A, B, s)
        out = self.base(x, adapter_ids)
        if adapter_ids is not None:
            delta = self._mixed(x, adapter_ids)
            return out if delta is None else out + delta.to(out.dtype)
        name = self.registry.active
        if name is None or name == self.registry.merged or name not in self.lora_A:
            return out
        return out + self._one(x, name).to(out.dtype)

    def _fusable(self, x: Tensor, name: str) -> bool:
        """Whether the single-adapter forward can run as one _FrozenBaseLora (the common training case)."""
        base, A = self.base, self.lora_A[name]
        if _quantized(base):  # a frozen QuantLinear: dequantize-then-matmul, in its compute dtype
            dense = getattr(base, "compute_dtype", None) in (None, x.dtype)
        else:
            dense = type(base).forward in (Linear.forward, nn.Linear.forward) and not base.weight.requires_grad
            dense = dense and x.dtype == base.weight.dtype
        return (
            dense
            and (base.bias is None or not base.bias.requires_grad)
            and x.dtype == A.dtype
            and (self.dropout[name] == 0 or not self.training)
        )

    def _one(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.dropout[name]
        h = F.dropout(x, p) if (p > 0 and self.training) else x  # no dropout work at p = 0 or in eval
        return F.linear(F.linear(h.to(A.dtype), A) * self.scaling[name], B)  # scale [T, r], not [T, out]

    def _mixed(self, x: Tensor, adapter_ids: Tensor) -> Tensor | None:
        """Per-row adapters. x: [B, S, in], adapter_ids: [B] indices into registry.names, -1 = base.

        Returns the per-row delta [B, S, out], or None when no row has an adapter on this layer."""
        names = self.registry.names
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.lora_A.values()):
            # Training a mixed batch: group rows by adapter so autograd sees ordinary matmuls.
            out = x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.base_weight_like().dtype)
            for i in adapter_ids.unique().tolist():
                if i < 0 or names[i] not in self.lora_A:
                    continue
                rows = (adapter_ids == i).nonzero().squeeze(1)
                out = out.index_add(0, rows, self._one(x[rows], names[i]))
            return out
        # Inference: rows are grouped by adapter (as S-LoRA/Punica's SGMV does), so each adapter's weights are
        # read once per step however many rows use it, and no per-row copy of the weights is made.
        plan = self._groups(adapter_ids, x.device)
        if plan is None:
            return None
        idx, inv, At, Bt = plan  # idx: [U*m] rows in group order, inv: [B]; At: [U, in, r], Bt: [U, r, out]
        S = x.shape[1]
        xg = x if idx is None else x[idx]  # [U*m, S, in]
        h = torch.bmm(xg.reshape(At.shape[0], -1, x.shape[-1]).to(At.dtype), At)  # [U, m*S, r_max]
        y = torch.bmm(h, Bt).reshape(-1, S, Bt.shape[-1])  # [U*m, S, out]
        return y if inv is None else y[inv]  # [B, S, out]

    def _groups(self, adapter_ids: Tensor, device) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor] | None:
        """Rows grouped by adapter, each group padded to the largest by repeating its first row.

        Returns (idx, inv, At, Bt): idx [U*m] the row of each group member (None when that is 0..B-1),
        inv [B] where each row's result lands (None when the identity), and the groups' A^T [U, in, r_max]
        and (s*B)^T [U, r_max, out]. Base rows form a group on the all-zero slot. Cached while the rows'
        adapters stay the same, which in continuous batching is most decode steps. (On CUDA, ids given as a
        CPU tensor spare the device sync that reading them costs.)
        """
        A_all, B_all = self._stacked()  # [N+1, r_max, in], [N+1, out, r_max]; slot N is all zeros (base)
        stack, key = self._stack_cache, tuple(adapter_ids.tolist())
        c = self._group_cache
        if c is not None and c[0] is stack and c[1] == key:
            return c[2]
        names, zero = self.registry.names, A_all.shape[0] - 1
        groups: dict[int, list[int]] = {}
        for row, i in enumerate(key):
            groups.setdefault(zero if i < 0 or names[i] not in self.lora_A else i, []).append(row)
        plan = None
        if set(groups) != {zero}:
            m = max(len(g) for g in groups.values())
            flat = [r for g in groups.values() for r in g + g[:1] * (m - len(g))]
            inv = [0] * len(key)
            for k, g in enumerate(groups.values()):
                for j, r in enumerate(g):
                    inv[r] = k * m + j
            slots = list(groups)
            lo = slots[0]
            if slots == list(range(lo, lo + len(slots))):  # contiguous: views into the stack, no copy
                At, Bt = A_all[lo:lo + len(slots)].transpose(1, 2), B_all[lo:lo + len(slots)].transpose(1, 2)
            else:
                At, Bt = A_all[slots].transpose(1, 2).contiguous(), B_all[slots].transpose(1, 2).contiguous()
            ident = list(range(len(key)))
            plan = (None if flat == ident else torch.tensor(flat, device=device),
                    # padding rows make y longer than the batch: then inv must pick the real rows out
                    None if inv == ident and len(flat) == len(key) else torch.tensor(inv, device=device), At, Bt)
        self._group_cache = (stack, key, plan)
        return plan

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """Every adapter's A and s*B, zero-padded to the largest rank and cached until a weight changes."""
        names = self.registry.names
        # Checked on every mixed forward: read the parameter dicts directly, as ParameterDict's own lookup
        # goes through Module.__getattr__ and costs more than the check itself.
        pa, pb = self.lora_A._parameters, self.lora_B._parameters
        key = (tuple(names),) + tuple((pa[n]._version, pb[n]._version, id(pa[n])) for n in names if n in pa)
        if self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1], self._stack_cache[2]
        w = self.base_weight_like()
        r_max = max((self.lora_A[n].shape[0] for n in names if n in self.lora_A), default=1)
        A_all = torch.zeros(len(names) + 1, r_max, self.in_features, dtype=w.dtype, device=w.device)
        B_all = torch.zeros(len(names) + 1, self.out_features, r_max, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            for i, n in enumerate(names):
                if n in self.lora_A:
                    r = self.lora_A[n].shape[0]
                    A_all[i, :r] = self.lora_A[n]
                    B_all[i, :, :r] = self.lora_B[n] * self.scaling[n]
        self._stack_cache = (key, A_all, B_all)
        return A_all, B_all

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"
