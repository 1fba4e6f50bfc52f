"""Export base + adapter as a plain Hugging Face folder that transformers loads without loraforge."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from ..model.config import ARCHITECTURES
from ..model.mlp import Experts
from ..paths import atomic_dir, atomic_write_json, check_output_dir, save_safetensors
from .experts import EXPERT_PARAMS, LoraExperts
from .layer import LoraLinear
from .model import registry

log = logging.getLogger("loraforge")


@torch.no_grad()
def merged_state_dict(model: nn.Module, adapter: str | None) -> tuple[dict[str, torch.Tensor], bool]:
    """Hugging Face-named weights with W + s*BA folded in. Returns (tensors, had_quantized_base).

    A quantized base is dequantized and the result kept in full precision: re-quantizing W + s*BA would
    throw away exactly the small update the adapter learned.
    """
    out: dict[str, torch.Tensor] = {}
    quantized = False
    handled: set[str] = set()
    for path, m in model.named_modules():
        if any(path.startswith(h + ".") for h in handled):
            continue  # inside stacked experts written whole (their per-expert quantized linears)
        if isinstance(m, LoraExperts):
            path_out = path
            handled.add(path)
            for param in EXPERT_PARAMS:
                w, q = _expert_weight(m.base, param)
                quantized |= q
                lora = m._modules.get(param)
                if lora is not None and adapter in lora.lora_A and registry(model).merged != adapter:
                    w = w + lora.delta_weight(adapter).to(w.dtype)
                if not torch.isfinite(w).all():
                    raise LoraForgeError(f"refusing to export: {path_out}.{param} has non-finite merged weights")
                out[f"{path_out}.{param}"] = w.cpu()
            continue
        if isinstance(m, Experts):  # no adapter on them, but maybe quantized: written stacked, as in memory
            handled.add(path)
            for param in EXPERT_PARAMS:
                w, q = _expert_weight(m, param)
                quantized |= q
                out[f"{path}.{param}"] = w.cpu()
            continue
        if isinstance(m, LoraLinear):
            base = m.base
            path_base = path
        elif hasattr(m, "quant_type") and hasattr(m, "dequantize") and not path.endswith(".base"):
            base, path_base = m, path
        else:
            continue
        handled.add(path_base)
        if hasattr(base, "dequantize"):
            quantized = True
            w = base.dequantize(torch.float32)
        else:
            w = base.weight.detach().clone()
        if isinstance(m, LoraLinear) and adapter is not None and adapter in m.lora_A \
                and registry(model).merged != adapter:
            # B @ A in the dtype written out: on a quantized base that is fp32 even when the adapter
            # trained in bf16, so the product is not rounded to bf16 first.
            A, B = m.lora_A[adapter].to(w.dtype), m.lora_B[adapter].to(w.dtype)
            w = w + (B @ A) * m.scaling[adapter]
        if not torch.isfinite(w).all():
            raise LoraForgeError(f"refusing to export: {path_base} has non-finite merged weights")
        out[f"{path_base}.weight"] = w.cpu()
        if getattr(base, "bias", None) is not None:
            out[f"{path_base}.bias"] = base.bias.detach().float().cpu() if quantized else base.bias.detach().cpu()
    for name, t in model.state_dict().items():
        mod = name.rsplit(".", 1)[0]
        if any(name.startswith(h + ".") for h in handled) or mod in handled:
            continue
        if ".lora_A." in name or ".lora_B." in name or name.startswith("prefix_adapters."):
            continue
        out[name] = t.detach().cpu()
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    if quantized:  # a quantized base means the rest should leave in fp32 too, not the compute dtype
        out = {k: (v.float() if v.is_floating_point() else v) for k, v in out.items()}
    return out, quantized


def _expert_weight(experts: Experts, param: str) -> tuple[torch.Tensor, bool]:
    """A stacked expert weight [E, out, in] (dequantized to fp32 from per-expert QLoRA codes), and whether
    it was quantized."""
    w = getattr(experts, param)
    if isinstance(w, nn.ModuleList):
        return torch.stack([q.dequantize(torch.float32) for q in w]), True
    return w.detach().clone(), False


def write_merged_folder(model: nn.Module, tokenizer, out_dir: str | Path, adapter: str | None = None, *,
                        overwrite: bool = False, inputs: list[str | Path] | tuple = ()) -> Path:
    """Write the merged model to the folder `out_dir`, a new or empty one unless `overwrite` (see
    paths.check_output_dir: never a folder that holds one of `inputs` or the model's own folder)."""
    own = [model.source_folder] if getattr(model, "source_folder", None) else []
    check_output_dir(out_dir, overwrite=overwrite, inputs=[*inputs, *own])
    reg = registry(model)
    adapter = adapter or reg.active
    tensors, quantized = merged_state_dict(model, adapter)
    dtype = next(iter(v for v in tensors.values() if v.is_floating_point())).dtype
    cfg = dict(model.config.hf_config)
    cfg.pop("quantization_config", None)
    cfg.setdefault("architectures", [ARCHITECTURES[model.config.model_type]])
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype).replace("torch.", "")
    if quantized:
        log.warning("the base was quantized: the merged model is written in full precision (%s), not re-quantized",
                    cfg["dtype"])
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", cfg)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return out_dir
