"""LoRA adapters in PEFT's on-disk format, so PEFT, vLLM and LoRAX read ours and we read theirs.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight`` ([out, r]).
Pickle files (``adapter_model.bin``) are refused: unpickling runs code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from ..paths import atomic_dir, atomic_write_json, save_safetensors
from .config import LoraConfig
from .model import add_lora, delete_adapter, linear_paths, lora_layers, registry, require_lora

log = logging.getLogger("loraforge")

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys we understand; anything else gets a warning (PEFT version skew is common).
KNOWN_KEYS = {
    "peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "bias", "task_type",
    "base_model_name_or_path", "fan_in_fan_out", "init_lora_weights", "modules_to_save", "inference_mode",
    "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern", "revision", "use_dora",
    "auto_mapping", "megatron_config", "megatron_core", "loftq_config", "layer_replication", "runtime_config",
    "exclude_modules", "lora_bias", "eva_config", "corda_config", "trainable_token_indices", "target_parameters",
    "peft_version", "use_qalora", "qalora_group_size", "alora_invocation_tokens", "arrow_config",
    "ensure_weight_tying", "lora_ga_config", "use_bdlora", "bdlora_config",
}


def save_adapter(model: nn.Module, name: str, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write adapter `name` as a PEFT LoRA folder (atomically: a crash leaves the old folder or none)."""
    reg = registry(model)
    cfg: LoraConfig = reg.configs[require_lora(model, name, "save as a LoRA adapter")]
    tensors, targets = {}, set()
    for path, layer in lora_layers(model):
        if name in layer.lora_A:
            tensors[f"{PREFIX}{path}.lora_A.weight"] = layer.lora_A[name].detach().cpu()
            tensors[f"{PREFIX}{path}.lora_B.weight"] = layer.lora_B[name].detach().cpu()
            targets.add(path.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or getattr(model, "name_or_path", None),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        # The resolved names, not "all-linear": vLLM and older PEFT only read a list.
        "target_modules": sorted(targets) if not isinstance(cfg.targets, str) or cfg.targets == "all-linear"
        else cfg.targets,
        "use_rslora": cfg.use_rslora,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "rank_pattern": cfg.rank_pattern,
        "alpha_pattern": cfg.alpha_pattern,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, config)
    return out_dir


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise LoraForgeError(f"{path}: no such adapter folder")
    cfg_path = path / CONFIG_FILE
    if not cfg_path.exists():
        raise LoraForgeError(f"{path}: not an adapter folder (no {CONFIG_FILE})")
    try:
        raw = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise LoraForgeError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise LoraForgeError(f"{cfg_path}: expected a JSON object")
    return raw


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise LoraForgeError(
                f"{path}: only adapter_model.bin (a pickle) is present; loraforge reads safetensors only, because "
                "unpickling runs code. Re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise LoraForgeError(f"{path}: no {WEIGHTS_FILE}")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraForgeError(f"{weights}: corrupt safetensors file ({e})") from None


def lora_config_from_peft(raw: dict, where: str) -> LoraConfig:
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        log.warning("%s: ignoring unknown adapter_config keys: %s", where, ", ".join(unknown))
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraForgeError(f"{where}: peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False)):
        if raw.get(key, ok) not in (ok, None):
            raise LoraForgeError(f"{where}: {key}={raw[key]!r} is not supported")
    if raw.get("bias", "none") != "none":
        raise LoraForgeError(f"{where}: bias={raw['bias']!r} is not supported (only 'none')")
    if raw.get("target_parameters"):
        raise LoraForgeError(f"{where}: target_parameters={raw['target_parameters']!r} (LoRA on stacked parameters, "
                             "such as MoE experts and routers) is not supported; target linear modules instead")
    if raw.get("modules_to_save"):
        raise LoraForgeError(f"{where}: modules_to_save={raw['modules_to_save']!r} (fully trained extra modules) "
                             "is not supported")
    try:
        return LoraConfig(
            r=int(raw.get("r", 8)),
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout") or 0.0),
            targets=raw.get("target_modules") or "all-linear",
            use_rslora=bool(raw.get("use_rslora", False)),
            rank_pattern=dict(raw.get("rank_pattern") or {}),
            alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        )
    except (TypeError, ValueError) as e:
        raise LoraForgeError(f"{where}: malformed field ({e})") from None


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Load a PEFT LoRA folder as adapter `name` (default: the folder's name). Returns the name.

    Everything is checked before the model is touched: a wrong-model adapter, a corrupt file or a pickle
    leaves the model exactly as it was.
    """
    path = Path(path)
    raw = read_adapter_config(path)
    if raw.get("peft_type") == "PREFIX_TUNING":
        raise LoraForgeError(f"{path}: a prefix-tuning adapter; load it with loraforge.prefix.load_prefix_adapter")
    name = name or path.resolve().name
    cfg = lora_config_from_peft(raw, str(path / CONFIG_FILE))
    tensors = read_adapter_tensors(path)
    # Map PEFT keys onto our module paths, and check every tensor has a home of the right shape.
    modules = {p: model.get_submodule(p) for p in linear_paths(model)}
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        k = k.replace(".default.weight", ".weight")
        for part in ("lora_A", "lora_B"):
            if k.endswith(f".{part}.weight"):
                mod = k[: -len(f".{part}.weight")]
                pairs.setdefault(mod, {})[part] = t
                break
        else:
            raise LoraForgeError(f"{path / WEIGHTS_FILE}: unsupported tensor {key!r} (only LoRA A/B of linear layers)")
    if not pairs:
        raise LoraForgeError(f"{path / WEIGHTS_FILE}: holds no LoRA weights")
    base_name = raw.get("base_model_name_or_path")
    for mod, ab in pairs.items():
        if mod not in modules:
            raise LoraForgeError(
                f"{path}: adapter targets {mod!r}, which this model does not have: it was made for another model "
                f"({base_name or 'unknown base'})"
            )
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoraForgeError(f"{path / WEIGHTS_FILE}: {mod} has only {', '.join(ab)}")
        A, B = ab["lora_A"], ab["lora_B"]
        m = modules[mod]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != m.in_features or B.shape[0] != m.out_features \
                or A.shape[0] != B.shape[1]:
            raise LoraForgeError(
                f"{path}: {mod} expects lora_A [r, {m.in_features}] and lora_B [{m.out_features}, r], the file has "
                f"{list(A.shape)} and {list(B.shape)}: this adapter was made for another model ({base_name or 'unknown'})"
            )
    # Ranks come from the tensors; alpha (and rsLoRA) from the config, with PEFT's per-module patterns.
    cfg.targets = sorted(pairs)
    reg = registry(model)
    if name in reg.configs:
        raise LoraForgeError(f"an adapter named {name!r} is already loaded")
    add_lora(model, name, _exact_targets(cfg), activate=activate)
    try:
        with torch.no_grad():
            for mod, ab in pairs.items():
                layer = model.get_submodule(mod)
                r = ab["lora_A"].shape[0]
                _, alpha = cfg.rank_alpha(mod)
                if layer.lora_A[name].shape[0] != r:  # rank from the file wins over the config's r
                    layer.add(name, r, cfg.scaling(r, alpha), cfg.dropout)
                layer.scaling[name] = cfg.scaling(r, alpha)
                layer.lora_A[name].copy_(ab["lora_A"])
                layer.lora_B[name].copy_(ab["lora_B"])
                layer.lora_A[name].requires_grad_(False)
                layer.lora_B[name].requires_grad_(False)
    except BaseException:
        delete_adapter(model, name)
        raise
    reg.configs[name] = cfg
    return name


def _exact_targets(cfg: LoraConfig) -> LoraConfig:
    """A copy of cfg whose targets match exactly the listed module paths (full regex match)."""
    import re
    from dataclasses import replace

    return replace(cfg, targets="|".join(re.escape(t) for t in cfg.targets))


def adapter_info(path: str | Path) -> dict:
    """What `loraforge info` prints for an adapter folder."""
    path = Path(path)
    raw = read_adapter_config(path)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info = {"path": str(path), "method": raw.get("peft_type"), "base_model": raw.get("base_model_name_or_path"),
            "size_on_disk_bytes": size}
    if raw.get("peft_type") == "LORA":
        info.update(rank=raw.get("r"), alpha=raw.get("lora_alpha"), targets=raw.get("target_modules"),
                    use_rslora=raw.get("use_rslora", False))
    elif raw.get("peft_type") == "PREFIX_TUNING":
        info.update(num_virtual_tokens=raw.get("num_virtual_tokens"))
    return info


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path, adapter: str | None = None) -> Path:
    """Write base + s*BA as a plain Hugging Face model folder (fp32/bf16 as the base; never re-quantized)."""
    from .merge_export import write_merged_folder

    return write_merged_folder(model, tokenizer, out_dir, adapter)


__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "adapter_info", "save_merged", "atomic_dir"]
