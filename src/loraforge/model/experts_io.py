"""Mixture-of-experts checkpoints: one tensor per expert on disk, two stacked tensors per layer in memory.

On disk (the hub's layout, which transformers 5 still writes):
    Mixtral    model.layers.i.block_sparse_moe.gate.weight, ...block_sparse_moe.experts.e.{w1,w3,w2}.weight
    Qwen3-MoE  model.layers.i.mlp.gate.weight,              ...mlp.experts.e.{gate_proj,up_proj,down_proj}.weight
In memory (transformers 5's names, which PEFT's adapter keys use):
    model.layers.i.mlp.gate.weight [E, H], mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows),
    mlp.experts.down_proj [E, H, I]
Pre-quantized (`loraforge quantize`; loraforge's own layout, as transformers + bitsandbytes keep experts in
full precision and read no quantized expert): each expert's [out, in] slice as the quantized linear
QLoRA makes of it, ``model.layers.i.mlp.experts.gate_up_proj.e.weight`` (+ ``.absmax``, ``.quant_state.*``:
quant/serialize.py), so loading it gives exactly what quantizing on load gives.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_EXPERT = re.compile(r"(model\.layers\.\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)"
                     r"\.weight")
_STORED = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)\.(\d+)\.weight")
_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def renamed(key: str) -> str:
    """Mixtral's on-disk router name -> the in-memory one; other keys unchanged."""
    return key.replace(".block_sparse_moe.gate.", ".mlp.gate.")


def expert_part(key: str) -> tuple[str, int, str] | None:
    """(layer prefix, expert index, "gate" | "up" | "down") for a per-expert weight, else None."""
    m = _EXPERT.fullmatch(key)
    return None if m is None else (m.group(1), int(m.group(2)), _PART[m.group(3)])


def stack_experts(parts: dict[tuple[str, int, str], torch.Tensor], n_experts: int,
                  where: str) -> dict[str, torch.Tensor]:
    """{layer.mlp.experts.gate_up_proj: [E, 2I, H], layer.mlp.experts.down_proj: [E, H, I]} from per-expert
    tensors; a missing expert weight is an error naming it."""
    from ..errors import LoraForgeError

    out = {}
    for layer in sorted({p[0] for p in parts}):
        def get(e: int, part: str, layer=layer) -> torch.Tensor:
            t = parts.get((layer, e, part))
            if t is None:
                raise LoraForgeError(f"{where}: expert {e}'s {part} weight of {layer} is missing from the checkpoint")
            return t

        out[f"{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([get(e, "gate"), get(e, "up")], dim=0) for e in range(n_experts)])
        out[f"{layer}.mlp.experts.down_proj"] = torch.stack([get(e, "down") for e in range(n_experts)])
    return out


def quantize_experts(model: nn.Module, spec, compute_dtype: torch.dtype) -> list[str]:
    """QLoRA on a MoE model: replace each layer's stacked expert weights by one frozen quantized linear per
    expert (bitsandbytes' codes for that expert's [out, in] weight). The router is never quantized: a
    rounded router would send tokens to other experts. Returns the quantized module paths."""
    from ..quant import QuantLinear
    from ..quant.checkpoint import quantize_weight

    done = []
    for path, experts in [(p, m) for p, m in model.named_modules() if type(m).__name__ == "Experts"]:
        for name in ("gate_up_proj", "down_proj"):
            w = getattr(experts, name)  # [E, out, in]
            delattr(experts, name)
            setattr(experts, name, nn.ModuleList(
                QuantLinear.from_state(quantize_weight(w[e].detach(), spec), None, compute_dtype)
                for e in range(w.shape[0])))
            done += [f"{path}.{name}.{e}" for e in range(w.shape[0])]
    return done


def stored_expert(name: str) -> tuple[str, str, int] | None:
    """(experts module path, "gate_up_proj" | "down_proj", expert) for a pre-quantized expert weight name."""
    m = _STORED.fullmatch(name)
    return None if m is None else (m.group(1), m.group(2), int(m.group(3)))


def use_quant_experts(model: nn.Module, names: list[str], spec, compute_dtype: torch.dtype, where: str) -> dict:
    """Replace the stacked expert weights of a model built on the meta device by one QuantLinear placeholder
    per expert, for the pre-quantized expert weights `names`; every expert of a weight must be stored.
    Returns {name: (out, in)}, the shape each stored weight must have."""
    from ..errors import LoraForgeError
    from ..quant import QuantLinear

    by_weight: dict[tuple[str, str], set[int]] = {}
    for n in names:
        path, param, e = stored_expert(n)
        by_weight.setdefault((path, param), set()).add(e)
    shapes = {}
    for (path, param), stored in sorted(by_weight.items()):
        try:
            experts = model.get_submodule(path)
        except AttributeError:
            experts = None
        if type(experts).__name__ != "Experts" or not isinstance(getattr(experts, param), nn.Parameter):
            raise LoraForgeError(f"{where}: {path}.{param} is stored quantized, but this model has no such experts")
        E, out_f, in_f = getattr(experts, param).shape
        if stored != set(range(E)):
            missing = sorted(set(range(E)) - stored) or sorted(stored - set(range(E)))
            raise LoraForgeError(f"{where}: {path}.{param} is stored quantized for experts {sorted(stored)[:8]}, "
                                 f"but the model has {E} (check expert {missing[0]})")
        delattr(experts, param)
        setattr(experts, param, nn.ModuleList(
            QuantLinear(in_f, out_f, bias=False, quant_type=spec.quant_type, blocksize=spec.blocksize,
                        double_quant=spec.double_quant, compute_dtype=compute_dtype, dtype=compute_dtype,
                        device="meta") for _ in range(E)))
        shapes.update({f"{path}.{param}.{e}.weight": (out_f, in_f) for e in range(E)})
    return shapes
