"""Adding, choosing, merging and removing LoRA adapters on a model (functions, not a model subclass).

    add_lora(model, "pirate", LoraConfig(r=16))     # wraps the targeted projections once
    set_adapter(model, "pirate")                     # a pointer switch, no weight copy
    with disable_adapter(model): ...                 # the bare base model
    model(ids, adapter_ids=adapter_ids_for(model, ["pirate", None, "butler"]))   # one adapter per row
    merge_adapter(model); unmerge_adapter(model)    # W += s*BA, exactly undone
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from ..errors import LoraForgeError
from ..model.loading import count_parameters, human
from .config import LoraConfig
from .experts import (
    ExpertLora,
    expert_layer,
    expert_param_paths,
    expert_shape,
    is_expert_param,
    router_param_paths,
)
from .layer import LoraLinear
from .registry import AdapterRegistry


def registry(model: nn.Module) -> AdapterRegistry:
    reg = getattr(model, "lora_registry", None)
    if reg is None:
        reg = AdapterRegistry()
        model.lora_registry = reg
    return reg


def require_lora(model: nn.Module, name: str | None, action: str) -> str:
    """`name` if it is a loaded LoRA adapter; otherwise one clear error (prefix adapters have no A/B)."""
    reg = registry(model)
    if name is None or name not in reg.configs:
        raise LoraForgeError(f"cannot {action}: no adapter named {name!r} (loaded: {', '.join(reg.names) or 'none'})")
    if not isinstance(reg.configs[name], LoraConfig):
        kind = type(reg.configs[name]).__name__.replace("Config", "").lower()
        raise LoraForgeError(f"cannot {action}: {name!r} is a {kind} adapter, not LoRA")
    return name


def is_linear(m: nn.Module) -> bool:
    """A projection LoRA can wrap: nn.Linear or a frozen quantized linear."""
    return isinstance(m, nn.Linear) or (hasattr(m, "quant_type") and hasattr(m, "in_features"))


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLinear | ExpertLora]]:
    """Every module that holds LoRA adapters: the wrapped projections and the adapted stacked expert weights
    (an ExpertLora's path is its weight's, ``...mlp.experts.gate_up_proj``). Both hold lora_A, lora_B and
    scaling by adapter name."""
    for path, m in model.named_modules():
        if isinstance(m, (LoraLinear, ExpertLora)):
            yield path, m


def linear_paths(model: nn.Module) -> list[str]:
    """The projections LoRA can target: not the MoE experts' per-expert quantized linears (an expert's
    weights are one stacked parameter in transformers and PEFT, not modules)."""
    out = []
    for path, m in model.named_modules():
        if isinstance(m, LoraLinear):
            out.append(path)
        elif is_linear(m) and not path.endswith(".base") and ".experts." not in path:
            out.append(path)
    return out


def add_lora(model: nn.Module, name: str = "default", config: LoraConfig | None = None,
             activate: bool = True) -> list[str]:
    """Add adapter `name` on every projection that `config.targets` selects; returns the module paths."""
    config = config or LoraConfig()
    registry(model).check_new_name(name)
    paths = [p for p in linear_paths(model) if config.matches(p)]
    if not paths and not config.target_parameters:
        kinds = sorted({p.rsplit(".", 1)[-1] for p in linear_paths(model)})
        raise LoraForgeError(f"targets {config.targets!r} match no linear layer; this model has: {', '.join(kinds)}")
    paths += target_parameter_paths(model, config.target_parameters, "target_parameters")
    plan = {}
    for path in paths:
        r, alpha = config.rank_alpha(path)
        plan[path] = (r, layer_scaling(model, path, config, r, alpha))
    attach_lora(model, name, config, plan, activate)
    return paths


def target_parameter_paths(model: nn.Module, target_parameters: list[str] | None, where: str) -> list[str]:
    """The stacked expert weights that `target_parameters` (PEFT's rule) selects; each entry must select one.
    The router is refused by name: adapting it would change which experts run."""
    if not target_parameters:
        return []
    experts, routers = expert_param_paths(model), router_param_paths(model)
    out = []
    for t in target_parameters:
        hits = [p for p in experts if p == t or p.endswith("." + t)]
        if not hits and any(p == t or p.endswith("." + t) for p in routers):
            raise LoraForgeError(f"{where}: {t!r} is the MoE router, which loraforge never adapts (all-linear "
                                 "leaves routers out); adapt mlp.experts.gate_up_proj / mlp.experts.down_proj")
        if not hits:
            raise LoraForgeError(f"{where}: {t!r} matches no MoE expert weight of this model "
                                 f"({'mlp.experts.gate_up_proj, mlp.experts.down_proj' if experts else 'it has none'})")
        out += [p for p in hits if p not in out]
    return out


def layer_scaling(model: nn.Module, path: str, config: LoraConfig, r: int, alpha: float) -> float:
    """The scaling of a rank-`r` adapter on layer `path`, after checking that r fits the layer.

    A rank above min(in, out) adds nothing a full-rank update could not (B @ A has rank <= min(in, out)),
    and an absurd one (r = 10**12) would try to allocate petabytes: both are refused.
    """
    if is_expert_param(model, path):  # a stacked expert weight: the rank is per expert
        _, out_f, in_f = expert_shape(model, path)
    else:
        layer = model.get_submodule(path)
        in_f, out_f = layer.in_features, layer.out_features
    limit = min(in_f, out_f)
    if not 1 <= r <= limit:
        raise LoraForgeError(f"rank {r} for {path} is outside 1..{limit} (the layer is "
                             f"{in_f} -> {out_f}, so min(in, out) = {limit})")
    s = config.scaling(r, alpha)
    if not math.isfinite(s):
        raise LoraForgeError(f"the scaling of {path} (alpha {alpha} / rank {r}) is not finite")
    return s


def attach_lora(model: nn.Module, name: str, config: LoraConfig, plan: dict[str, tuple[int, float]],
                activate: bool = True) -> None:
    """Wrap and add adapter `name` with {module path: (rank, scaling)}, all validated by the caller."""
    reg = registry(model)
    reg.check_new_name(name)
    for path, (r, s) in plan.items():
        if is_expert_param(model, path):
            expert_layer(model, path, reg).add(name, r, s, config.dropout, config.init)
            continue
        layer = model.get_submodule(path)
        if not isinstance(layer, LoraLinear):
            parent_path, _, attr = path.rpartition(".")
            layer = LoraLinear(layer, reg).train(layer.training)  # a new module must not flip eval to train
            setattr(model.get_submodule(parent_path), attr, layer)
        layer.add(name, r, s, config.dropout, config.init)
    reg.names.append(name)
    reg.configs[name] = config
    if activate:
        reg.active = name


def set_adapter(model: nn.Module, name: str | None) -> None:
    reg = registry(model)
    if name is not None and name not in reg.configs:
        raise LoraForgeError(f"no adapter named {name!r}; loaded: {', '.join(reg.names) or 'none'}")
    if reg.merged is not None and name != reg.merged:
        raise LoraForgeError(f"adapter {reg.merged!r} is merged into the base weights; unmerge it before switching")
    reg.active = name


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[None]:
    """Run the bare base model inside the block."""
    reg = registry(model)
    if reg.merged is not None:
        raise LoraForgeError(f"adapter {reg.merged!r} is merged into the base weights; unmerge it first")
    prev, reg.active = reg.active, None
    try:
        yield
    finally:
        reg.active = prev


def delete_adapter(model: nn.Module, name: str) -> None:
    reg = registry(model)
    if name not in reg.configs:
        raise LoraForgeError(f"no adapter named {name!r}")
    if reg.merged == name:
        raise LoraForgeError(f"adapter {name!r} is merged; unmerge it before deleting")
    for _, layer in lora_layers(model):
        layer.remove(name)
    reg.names.remove(name)
    del reg.configs[name]
    if reg.active == name:
        reg.active = None


def adapter_ids_for(model: nn.Module, names: list[str | None], device=None) -> torch.Tensor:
    """[B] long tensor of per-row adapter indices for a mixed batch; None means the base model."""
    reg = registry(model)
    ids = []
    for n in names:
        if n is None:
            ids.append(-1)
        elif n not in reg.configs:
            raise LoraForgeError(f"no adapter named {n!r}; loaded: {', '.join(reg.names) or 'none'}")
        else:
            ids.append(reg.names.index(n))
    if reg.merged is not None:
        raise LoraForgeError(f"adapter {reg.merged!r} is merged; unmerge it before running a mixed batch")
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def merge_adapter(model: nn.Module, name: str | None = None) -> None:
    """W <- W + s*B@A in place for every layer of `name` (the active adapter by default).

    Refuses (and changes nothing) when any delta or merged weight would be non-finite (PEFT's safe_merge).
    """
    reg = registry(model)
    name = require_lora(model, name or reg.active, "merge")
    if reg.merged is not None:
        raise LoraForgeError(f"adapter {reg.merged!r} is already merged; unmerge it first")
    layers = [(p, layer) for p, layer in lora_layers(model) if name in layer.lora_A]
    for path, layer in layers:
        w = _merge_target(layer)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            raise LoraForgeError(f"{path}: cannot merge into a quantized base in place; use `loraforge merge`, "
                                 "which writes a full-precision model")
        delta = layer.delta_weight(name)
        if not torch.isfinite(delta).all() or not torch.isfinite(w + delta).all():
            raise LoraForgeError(f"refusing to merge adapter {name!r}: {path} would get non-finite weights")
    for _, layer in layers:
        w = _merge_target(layer)
        w += layer.delta_weight(name).to(w.dtype)
    reg.merged, reg.active = name, name


def _merge_target(layer: LoraLinear | ExpertLora):
    """The weight a merge adds into: the projection's [out, in] or the stacked experts' [E, out, in] (a
    quantized base gives something else, which merge refuses)."""
    return layer.stacked() if isinstance(layer, ExpertLora) else getattr(layer.base, "weight", None)


@torch.no_grad()
def unmerge_adapter(model: nn.Module) -> None:
    reg = registry(model)
    if reg.merged is None:
        raise LoraForgeError("no adapter is merged")
    for _, layer in lora_layers(model):
        if reg.merged in layer.lora_A:
            w = _merge_target(layer)
            w -= layer.delta_weight(reg.merged).to(w.dtype)
    reg.merged = None


def get_adapter_params(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """{module_path.lora_A / .lora_B: parameter} for one adapter."""
    require_lora(model, name, "get LoRA parameters")
    out = {}
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            out[f"{path}.lora_A"] = layer.lora_A[name]
            out[f"{path}.lora_B"] = layer.lora_B[name]
    return out


def set_trainable_params(model: nn.Module, name: str, master_dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Freeze everything but adapter `name`; returns the trainable parameters.

    They become `master_dtype` (fp32) copies if they are not already: with a bf16 base the products run
    in bf16, but AdamW updates of ~1e-6 relative size would vanish in bf16's 8-bit mantissa."""
    model.requires_grad_(False)
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            layer.set_dtype(name, master_dtype)
    params = list(get_adapter_params(model, name).values())
    for p in params:
        p.requires_grad_(True)
    return params


def trainable_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable parameters, all parameters of the model as it trains, adapters included), as PEFT's
    print_trainable_parameters counts them: the one definition `train` and `compare` report."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, count_parameters(model)


def trainable_report(model: nn.Module) -> str:
    trainable, total = trainable_counts(model)
    return f"trainable {human(trainable)} of {human(total)} ({100 * trainable / max(total, 1):.2f}%)"
