"""The LoRA layer: a plain module that wraps a frozen base projection (composition, not inheritance).

    y = base(x) + s * B(A(dropout(x))),   A: [r, in], B: [out, r], s = alpha / r (or alpha / sqrt(r))

B(Ax) costs r * (in + out) per token; (BA)x would form an [out, in] matrix per step, so the forward
never multiplies B by A. Several named adapters live side by side; which one runs is decided by the
shared ``AdapterRegistry`` (a pointer switch) or, for a mixed batch, by the per-row ``adapter_ids``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..model.linear import Linear
from ..ops import dropout_mask, dropout_ref, frozen_linear, lora_linear
from .registry import AdapterRegistry


def _quantized(base: nn.Module) -> bool:
    """A frozen quantized linear (loraforge.quant.QuantLinear): it can hand out its weight dequantized."""
    return hasattr(base, "quant_type") and callable(getattr(base, "dequantize", None))


def lora_weight_like(base: nn.Module) -> Tensor:
    """A tensor with the dtype/device LoRA weights on `base` should have: its float weight, or for a
    quantized base (packed integer codes) an empty tensor in the dtype it computes in."""
    w = getattr(base, "weight", None)
    if w is not None and w.is_floating_point():
        return w
    # QuantLinear: compute_dtype is the load dtype (fp32 on CPU); weight_dtype is what it was quantized from
    dt = getattr(base, "compute_dtype", None) or getattr(base, "weight_dtype", None) or torch.float32
    dev = w.device if w is not None else next((b.device for b in base.buffers()), torch.device("cpu"))
    return torch.empty(0, dtype=dt, device=dev)


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
        # (stack, row adapter ids, plan, the ids tensor) of the last mixed batch; a caller that hands every
        # layer the same ids tensor, step after step, spares each layer reading it (the serve engine does)
        self._group_cache: tuple | None = None

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
        self._stack_cache = None
        self._group_cache = None

    def remove(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)
        self.dropout.pop(name, None)
        self._stack_cache = None
        self._group_cache = None

    def set_dtype(self, name: str, dtype: torch.dtype) -> None:
        """Store adapter `name`'s A and B in `dtype` (new parameters: an optimizer must be built after)."""
        for d in (self.lora_A, self.lora_B):
            if d[name].dtype != dtype:
                d[name] = nn.Parameter(d[name].detach().to(dtype), requires_grad=d[name].requires_grad)
        self._stack_cache = None
        self._group_cache = None

    def base_weight_like(self) -> Tensor:
        return lora_weight_like(self.base)

    def delta_weight(self, name: str) -> Tensor:
        """s * B @ A, [out, in]: only for merging, never in the forward."""
        return (self.lora_B[name] @ self.lora_A[name]) * self.scaling[name]

    # -- forward --------------------------------------------------------------------------------------------
    def forward(self, x: Tensor, adapter_ids: Tensor | None = None) -> Tensor:
        if adapter_ids is not None:
            return self._mixed(x, adapter_ids, self.base(x, adapter_ids))
        name = self.registry.active
        if name is None or name == self.registry.merged or name not in self.lora_A:
            return self.base(x)
        # the fused autograd fn is for training; inference runs the plain products
        if torch.is_grad_enabled() and self._fusable(name):
            base, A, B, s = self.base, self.lora_A[name], self.lora_B[name], self.scaling[name]
            p = self.dropout[name]
            keep = dropout_mask(x, p) if (p > 0 and self.training) else None  # dropout feeds only the A product
            W = None if _quantized(base) else base.weight
            return lora_linear(x, W, base.bias, A, B, s, keep, p, base.dequantize if W is None else None)
        if not torch.is_grad_enabled() and _fp32_delta(x, self.base_weight_like()):
            # decoding on CPU in 16 bits: the small products in fp32
            return _add_delta(self.base(x), _low_rank(x, *self._stacked_one(name)))
        return _add_delta(self.base(x), self._one(x, name))

    def _fusable(self, name: str) -> bool:
        """Whether the single-adapter forward can run as one fused lora_linear (the training case): a
        frozen plain or quantized base. The op runs in the compute dtype (autocast's, else the input's)
        and casts base and adapter weights to it, so a bf16 base with fp32 master weights fuses too."""
        base = self.base
        if _quantized(base):
            dense = True
        else:
            dense = type(base).forward in (Linear.forward, nn.Linear.forward) and not base.weight.requires_grad
        return dense and (base.bias is None or not base.bias.requires_grad) and name in self.lora_A

    def _one(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        p = self.dropout[name]
        h = dropout_ref(x, dropout_mask(x, p), p) if (p > 0 and self.training) else x  # none at p = 0 or in eval
        # scale [T, r], not [T, out]; the products only feed the next op (see frozen_linear)
        return frozen_linear(frozen_linear(h.to(A.dtype), A, contiguous=False) * self.scaling[name], B, contiguous=False)

    def _mixed(self, x: Tensor, adapter_ids: Tensor, out: Tensor) -> Tensor:
        """Per-row adapters: the base output `out` [B, S, out] plus each row's own low-rank delta.

        x: [B, S, in], adapter_ids: [B] indices into registry.names, -1 = base."""
        names = self.registry.names
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.lora_A.values()):
            # Training a mixed batch: group rows by adapter so autograd sees ordinary matmuls.
            delta = x.new_zeros(*x.shape[:-1], self.out_features, dtype=self.base_weight_like().dtype)
            for i in adapter_ids.unique().tolist():
                if i < 0 or names[i] not in self.lora_A:
                    continue
                rows = (adapter_ids == i).nonzero().squeeze(1)
                delta = delta.index_add(0, rows, self._one(x[rows], names[i]))
            return _add_delta(out, delta)
        # Inference: each adapter's weights are read once per forward however many rows use it (as
        # S-LoRA/Punica's SGMV does), and no per-row copy of the weights is made.
        plan = self._groups(adapter_ids, x.device)
        if plan is None:
            return out
        if plan.single is not None:  # every adapter row on one adapter: two GEMMs, as for the active adapter
            return _add_delta(out, _low_rank(x, *_product_dtype(*plan.single, x.numel() // x.shape[-1], out.dtype)))
        # Several adapters: batched GEMMs over the groups. For decoding (one token per row) this is 2-3x
        # faster than one GEMM over all the adapters' A side by side with each row masked to its own columns,
        # which reads the same weights (measured with cold weights, 8 rows on 8 adapters, 576 -> 1536:
        # 32 vs 64-75 us).
        S = x.shape[1]
        xg = x if plan.idx is None else x[plan.idx]  # [U*m, S, in]
        At, Bt = _product_dtype(plan.At, plan.Bt, xg.shape[0] // plan.groups * S, out.dtype)
        h = torch.bmm(xg.reshape(plan.groups, -1, x.shape[-1]).to(At.dtype), At)  # [U, m*S, r_max]
        y = torch.bmm(h, Bt).reshape(-1, S, Bt.shape[-1])  # [U*m, S, out]
        return _add_delta(out, y if plan.inv is None else y[plan.inv])  # [B, S, out]

    def _groups(self, adapter_ids: Tensor, device) -> _Plan | None:
        """This batch's rows grouped by adapter (None when no row has an adapter on this layer).

        Base rows form a group on the all-zero slot of the stack. Cached while the rows' adapters stay
        the same, which in continuous batching is most decode steps. (On CUDA, ids given as a CPU tensor
        spare the device sync that reading them costs.)
        """
        A_all, B_all = self._stacked()  # [N+1, r_max, in], [N+1, out, r_max]; slot N is all zeros (base)
        stack, c = self._stack_cache, self._group_cache
        if c is not None and c[0] is stack and c[3] is adapter_ids:  # the same ids tensor as last time
            return c[2]
        key = tuple(adapter_ids.tolist())
        if c is not None and c[0] is stack and c[1] == key:
            self._group_cache = (stack, key, c[2], adapter_ids)
            return c[2]
        names, zero = self.registry.names, A_all.shape[0] - 1
        groups: dict[int, list[int]] = {}
        for row, i in enumerate(key):
            groups.setdefault(zero if i < 0 or names[i] not in self.lora_A else i, []).append(row)
        # in stack order, whatever order the rows came in: a batch on adapters that sit side by side in the
        # stack (as a server's usually do) then reads them through views, with no copy of their weights
        slots = sorted(groups)
        plan = None if slots == [zero] else _Plan([groups[i] for i in slots], slots, A_all, B_all, device)
        self._group_cache = (stack, key, plan, adapter_ids)
        return plan

    def _stacked_one(self, name: str) -> tuple[Tensor, Tensor]:
        """Adapter `name`'s A [r_max, in] and s*B [out, r_max] from the stack (zero-padded, in its dtype)."""
        A_all, B_all = self._stacked()
        i = self.registry.names.index(name)
        return A_all[i], B_all[i]

    def _stacked(self) -> tuple[Tensor, Tensor]:
        """Every adapter's A and s*B, zero-padded to the largest rank and cached until a weight changes.

        On CPU a 16-bit model's stacks are fp32 (see _fp32_delta): they serve inference, where the rows
        are few and the adapters small.
        """
        names = self.registry.names
        # Checked by every layer on every mixed forward, so kept to a list compare: the same adapter names
        # in the same order, and no weight written in place since (an optimizer step or a copy_ bumps a
        # tensor's version; add/remove drop the cache).
        c = self._stack_cache
        if c is not None and c[0] == names and [p._version for p in c[3]] == c[4]:
            return c[1], c[2]
        w = self.base_weight_like()
        dtype = torch.float32 if w.device.type == "cpu" and w.dtype in HALF else w.dtype
        r_max = max((self.lora_A[n].shape[0] for n in names if n in self.lora_A), default=1)
        A_all = torch.zeros(len(names) + 1, r_max, self.in_features, dtype=dtype, device=w.device)
        B_all = torch.zeros(len(names) + 1, self.out_features, r_max, dtype=dtype, device=w.device)
        with torch.no_grad():
            for i, n in enumerate(names):
                if n in self.lora_A:
                    r = self.lora_A[n].shape[0]
                    A_all[i, :r] = self.lora_A[n]
                    B_all[i, :, :r] = self.lora_B[n] * self.scaling[n]
        params = [p for n in names if n in self.lora_A for p in (self.lora_A[n], self.lora_B[n])]
        self._stack_cache = (list(names), A_all, B_all, params, [p._version for p in params])
        return A_all, B_all

    def extra_repr(self) -> str:
        ranks = {n: a.shape[0] for n, a in self.lora_A.items()}
        return f"in={self.in_features}, out={self.out_features}, adapters={ranks}"


HALF = (torch.bfloat16, torch.float16)
FP32_DELTA_MAX_TOKENS = 64


def _fp32_delta(x: Tensor, w: Tensor) -> bool:
    """Whether a 16-bit LoRA delta for `x` is cheaper in fp32: on CPU, for a few tokens (decoding).

    A 16-bit GEMM as small as x @ A^T (r = 8-64 columns) costs a fixed ~40 us on CPU (measured on a Xeon
    with AMX: T = 8 tokens, 576 -> 16 -> 1536: 79 us in bf16 against 36 us in fp32 with the casts); from
    ~100 tokens on, bf16 wins (T = 512: 154 against 380 us). Autocast recasts the products to 16 bits
    anyway, so it keeps the 16-bit path.
    """
    return (w.dtype in HALF and x.device.type == "cpu" and x.numel() <= FP32_DELTA_MAX_TOKENS * x.shape[-1]
            and not torch.is_autocast_enabled("cpu"))


def _product_dtype(A: Tensor, B: Tensor, tokens: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A stack slice's (A, s*B) for a product over `tokens` rows: the fp32 stack of a 16-bit model on CPU
    as it is for a few tokens, cast to the model's `dtype` for more (see _fp32_delta)."""
    if A.dtype != dtype and tokens > FP32_DELTA_MAX_TOKENS:
        return A.to(dtype), B.to(dtype)
    return A, B


def _low_rank(x: Tensor, A: Tensor, sB: Tensor) -> Tensor:
    """x A^T (sB)^T in A's dtype, for inference: A [r, in] and s*B [out, r] from the stack; the result
    only feeds _add_delta (see frozen_linear's contiguous=False)."""
    return frozen_linear(frozen_linear(x.to(A.dtype), A, contiguous=False), sB, contiguous=False)


def _add_delta(out: Tensor, delta: Tensor) -> Tensor:
    """out + delta; in place when nothing records gradients (out is then the base's fresh output; an fp32
    delta is rounded once, into the 16-bit out)."""
    if not torch.is_grad_enabled():
        return out.add_(delta)
    return out + delta.to(out.dtype)


class _Plan:
    """How one mixed batch meets the adapters: rows grouped by stack slot.

    With a single group, `single` is its (A [r_max, in], s*B [out, r_max]). Otherwise, for the batched-GEMM
    form, each group is padded to the largest by repeating its first row: idx [U*m] is the row of each
    group member (None when that is 0..B-1), inv [B] where each row's result lands (None when the
    identity), At [U, in, r_max] the groups' A^T and Bt [U, r_max, out] their (s*B)^T.
    """

    def __init__(self, groups: list[list[int]], slots: list[int], A_all: Tensor, B_all: Tensor, device):
        self.groups = len(groups)
        self.single = (A_all[slots[0]], B_all[slots[0]]) if len(groups) == 1 else None
        n = sum(len(g) for g in groups)
        m = max(len(g) for g in groups)
        flat = [r for g in groups for r in g + g[:1] * (m - len(g))]
        inv = [0] * n
        for k, g in enumerate(groups):
            for j, r in enumerate(g):
                inv[r] = k * m + j
        lo = slots[0]
        if slots == list(range(lo, lo + len(slots))):  # contiguous: views into the stack, no copy
            self.At, self.Bt = A_all[lo:lo + len(slots)].transpose(1, 2), B_all[lo:lo + len(slots)].transpose(1, 2)
        else:
            self.At, self.Bt = A_all[slots].transpose(1, 2), B_all[slots].transpose(1, 2)
        ident = list(range(n))
        self.idx = None if flat == ident else torch.tensor(flat, device=device)
        # padding rows make y longer than the batch: then inv must pick the real rows out
        self.inv = None if inv == ident and len(flat) == n else torch.tensor(inv, device=device)
