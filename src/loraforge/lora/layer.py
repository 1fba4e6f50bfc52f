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

from .registry import AdapterRegistry


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

    def base_weight_like(self) -> Tensor:
        """A tensor with the dtype/device LoRA weights should have (the base's float weight or bias)."""
        w = getattr(self.base, "weight", None)
        if w is not None and w.is_floating_point():
            return w
        dt = getattr(self.base, "compute_dtype", None) or torch.float32
        dev = next((b.device for b in self.base.buffers()), torch.device("cpu"))
        return torch.empty(0, dtype=dt, device=dev)

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A, [out, in]: only for merging, never in the forward."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        out = self.base(x, adapter_ids)
        if adapter_ids is not None:
            return out + self._mixed(x, adapter_ids).to(out.dtype)
        name = self.registry.active
        if name is None or name == self.registry.merged or name not in self.lora_A:
            return out
        return out + self._one(x, name).to(out.dtype)

    def _one(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.dropout[name]
        h = F.dropout(x, p) if (p > 0 and self.training) else x  # no dropout work at p = 0 or in eval
        return F.linear(F.linear(h.to(A.dtype), A), B) * self.scaling[name]

    def _mixed(self, x: Tensor, adapter_ids: Tensor) -> Tensor:
        """Per-row adapters. x: [B, S, in], adapter_ids: [B] indices into registry.names, -1 = base."""
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
        A_all, B_all = self._stacked()  # [N+1, r_max, in], [N+1, out, r_max]; slot N is all zeros (base)
        slot = torch.where(adapter_ids < 0, A_all.shape[0] - 1, adapter_ids)
        h = torch.bmm(x.to(A_all.dtype), A_all[slot].transpose(1, 2))  # [B, S, r_max]
        return torch.bmm(h, B_all[slot].transpose(1, 2))  # [B, S, out]

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """Every adapter's A and s*B, zero-padded to the largest rank and cached until a weight changes."""
        names = self.registry.names
        key = (tuple(names),) + tuple(
            (self.lora_A[n]._version, self.lora_B[n]._version, id(self.lora_A[n])) for n in names if n in self.lora_A
        )
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
