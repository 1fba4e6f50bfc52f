"""LoRA on a mixture-of-experts block's stacked expert weights, laid out as PEFT's ``target_parameters`` keeps it.

For a stacked weight W [E, out, in] (transformers' ``mlp.experts.gate_up_proj`` [E, 2I, H] and
``mlp.experts.down_proj`` [E, H, I]), PEFT's ParamWrapper holds one A [r*E, in] and one B [out, r*E] per
adapter, and expert e's update is

    dW_e = s * B_e @ A_e,   A_e = A.view(E, r, in)[e]  [r, in],   B_e = B.view(out, r, E)[:, :, e]  [out, r]

(A's rows are expert-major, B's columns rank-major). PEFT folds dW into W for its forward; here each expert
adds two thin products to its output instead, y_e = x W_e^T + s * (x A_e^T) B_e^T, so no [E, out, in]
tensor is formed (the same maths, equal to PEFT's to rounding). Dropout is refused on these weights, as
PEFT refuses it (a folded weight cannot drop out inputs), so every adapter saved here is one PEFT loads.

The wrapper keeps transformers' names: ``mlp.experts`` becomes a LoraExperts whose ``base`` is the Experts
module and whose children ``gate_up_proj`` / ``down_proj`` (ExpertLora, one per targeted weight) carry
the adapters, so an adapter's module path is the PEFT target_parameters key ``...mlp.experts.gate_up_proj``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.mlp import Experts
from .layer import lora_weight_like
from .registry import AdapterRegistry

# The stacked weights of an Experts module, in its definition order: the order PEFT wraps them in, which
# decides their saved key names (see peft_key_prefixes).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class ExpertLora(nn.Module):
    """The adapters on one stacked expert weight (``experts.<param>``): {name: A [r*E, in]}, {name: B [out, r*E]}."""

    def __init__(self, experts: Experts, param: str, registry: AdapterRegistry):
        super().__init__()
        # Neither is a submodule: the Experts belongs to the LoraExperts wrapper, the registry to the model.
        object.__setattr__(self, "experts", experts)
        object.__setattr__(self, "registry", registry)
        self.param = param
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}

    # -- the weight it adapts -------------------------------------------------------------------------------
    def stacked(self) -> Tensor | nn.ModuleList:
        """The stacked float weight [E, out, in], or (QLoRA) the ModuleList of one quantized linear per expert."""
        return getattr(self.experts, self.param)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(E, out, in)."""
        return stacked_shape(self.stacked())

    @property
    def in_features(self) -> int:
        return self.shape[2]

    @property
    def out_features(self) -> int:
        return self.shape[1]

    def base_weight_like(self) -> Tensor:
        return stacked_weight_like(self.stacked())

    # -- adapters -----------------------------------------------------------------------------------------
    def add(self, name: str, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming") -> None:
        assert dropout == 0, "LoraConfig refuses dropout on expert weights"
        E, out, in_ = self.shape
        w = self.base_weight_like()
        A = torch.empty(r * E, in_, dtype=w.dtype, device=w.device)
        if init == "gaussian":
            nn.init.normal_(A, std=1.0 / r)
        else:  # as PEFT's nn.Linear(in, r*E) for A: Kaiming-uniform over fan-in `in`
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(A)
        self.lora_B[name] = nn.Parameter(torch.zeros(out, r * E, dtype=w.dtype, device=w.device))
        self.scaling[name] = scaling

    def remove(self, name: str) -> None:
        for d in (self.lora_A, self.lora_B):
            if name in d:
                del d[name]
        self.scaling.pop(name, None)

    def set_dtype(self, name: str, dtype: torch.dtype) -> None:
        """Store adapter `name`'s A and B in `dtype` (new parameters: an optimizer must be built after)."""
        for d in (self.lora_A, self.lora_B):
            if d[name].dtype != dtype:
                d[name] = nn.Parameter(d[name].detach().to(dtype), requires_grad=d[name].requires_grad)

    def factors(self, name: str, e: int) -> tuple[Tensor, Tensor]:
        """Expert e's (A_e [r, in], B_e [out, r]): views into the adapter's A and B, so gradients reach them."""
        A, B = self.lora_A[name], self.lora_B[name]
        E = self.shape[0]
        r = A.shape[0] // E
        return A.view(E, r, -1)[e], B.view(B.shape[0], r, E)[:, :, e]

    def delta_weight(self, name: str) -> Tensor:
        """s * B_e @ A_e for every expert, [E, out, in]: only for merging, never in the forward."""
        E = self.shape[0]
        A, B = self.lora_A[name], self.lora_B[name]
        r = A.shape[0] // E
        return torch.einsum("oke,eki->eoi", B.view(B.shape[0], r, E), A.view(E, r, -1)) * self.scaling[name]

    # -- forward --------------------------------------------------------------------------------------------
    def delta(self, e: int, x: Tensor, adapter_ids: Tensor | None) -> Tensor | None:
        """The adapters' term for expert e's tokens x [n, in] -> [n, out], or None when no adapter applies.
        adapter_ids: [n] per-token adapter indices (-1 = base) of a mixed batch, or None (the active one)."""
        reg = self.registry
        if adapter_ids is None:
            name = reg.active
            if name is None or name == reg.merged or name not in self.lora_A:
                return None
            return self._one(x, e, name)
        out = None
        for i in adapter_ids.unique().tolist():
            if i < 0 or reg.names[i] not in self.lora_A:
                continue
            rows = (adapter_ids == i).nonzero().squeeze(1)
            d = self._one(x[rows], e, reg.names[i])  # [m, out]
            out = (x.new_zeros(x.shape[0], d.shape[1], dtype=d.dtype) if out is None else out).index_add(0, rows, d)
        return out

    def _one(self, x: Tensor, e: int, name: str) -> Tensor:
        A_e, B_e = self.factors(name, e)
        # scale [n, r], not [n, out]
        return F.linear(F.linear(x.to(A_e.dtype), A_e) * self.scaling[name], B_e)

    def extra_repr(self) -> str:
        E = self.shape[0]
        return f"{self.param}: experts={E}, adapters={ {n: a.shape[0] // E for n, a in self.lora_A.items()} }"


class LoraExperts(nn.Module):
    """Wraps an Experts module (kept as ``base``); its ExpertLora children add their adapters' terms."""

    def __init__(self, base: Experts):
        super().__init__()
        self.base = base

    def forward(self, x: Tensor, e: int, adapter_ids: Tensor | None = None) -> Tensor:
        # x: [n, hidden] tokens routed to expert e; adapter_ids: [n] per token or None
        return self.base(x, e, delta=partial(self._delta, adapter_ids))

    def _delta(self, adapter_ids: Tensor | None, param: str, e: int, x: Tensor) -> Tensor | None:
        layer = self._modules.get(param)
        return None if layer is None else layer.delta(e, x, adapter_ids)


def stacked_shape(w: Tensor | nn.ModuleList) -> tuple[int, int, int]:
    """(E, out, in) of a stacked expert weight, or of its per-expert quantized linears."""
    if isinstance(w, nn.ModuleList):
        return len(w), w[0].out_features, w[0].in_features
    return tuple(w.shape)


def stacked_weight_like(w: Tensor | nn.ModuleList) -> Tensor:
    """A tensor with the dtype/device LoRA weights on this stacked expert weight should have."""
    return lora_weight_like(w[0]) if isinstance(w, nn.ModuleList) else w


def expert_weight(model: nn.Module, path: str) -> Tensor | nn.ModuleList:
    """The stacked expert weight at `path` (``...mlp.experts.gate_up_proj``), adapted or not."""
    parent, _, param = path.rpartition(".")
    m = model.get_submodule(parent)
    return getattr(m.base if isinstance(m, LoraExperts) else m, param)


def expert_param_paths(model: nn.Module) -> list[str]:
    """Every stacked expert weight LoRA can target, by its transformers/PEFT name (``...mlp.experts.down_proj``)."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, Experts) and not path.endswith(".base"):
            out += [f"{path}.{p}" for p in EXPERT_PARAMS]
        elif isinstance(m, LoraExperts):
            out += [f"{path}.{p}" for p in EXPERT_PARAMS]
    return out


def router_param_paths(model: nn.Module) -> list[str]:
    """The MoE routers' weights (``...mlp.gate.weight``), which PEFT's all-linear adapts and loraforge never does."""
    return [f"{path}.weight" for path, m in model.named_modules() if type(m).__name__ == "Router"]


def is_expert_param(model: nn.Module, path: str) -> bool:
    """Whether `path` names a stacked expert weight (``...mlp.experts.gate_up_proj``), adapted or not."""
    parent, _, param = path.rpartition(".")
    if param not in EXPERT_PARAMS:
        return False
    try:
        return isinstance(model.get_submodule(parent), (Experts, LoraExperts))
    except AttributeError:
        return False


def expert_shape(model: nn.Module, path: str) -> tuple[int, int, int]:
    """(E, out, in) of the stacked expert weight at `path`."""
    return stacked_shape(expert_weight(model, path))


def expert_layer(model: nn.Module, path: str, registry: AdapterRegistry) -> ExpertLora:
    """The ExpertLora for the stacked weight at `path`, wrapping its Experts module first if needed."""
    parent, _, param = path.rpartition(".")
    m = model.get_submodule(parent)
    if not isinstance(m, LoraExperts):
        grand, _, attr = parent.rpartition(".")
        m = LoraExperts(m).train(m.training)
        setattr(model.get_submodule(grand), attr, m)
    if param not in m._modules:
        m.add_module(param, ExpertLora(m.base, param, registry))
    return m._modules[param]


def peft_key_prefixes(experts_path: str, params: list[str]) -> dict[str, str]:
    """{param: the module path PEFT saves its lora_A / lora_B under} for the weights of one experts module
    that an adapter targets. PEFT wraps them one inside the other in the module's parameter order (the
    first innermost), so the last is ``experts`` itself and each earlier one is a ``.base_layer`` deeper."""
    ordered = [p for p in EXPERT_PARAMS if p in params]
    n = len(ordered)
    return {p: experts_path + ".base_layer" * (n - 1 - i) for i, p in enumerate(ordered)}
