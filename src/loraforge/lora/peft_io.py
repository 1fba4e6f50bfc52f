"""LoRA adapters in PEFT's on-disk format, so PEFT, vLLM and LoRAX read ours and we read theirs.

A folder holds ``adapter_config.json`` and ``adapter_model.safetensors`` whose keys are
``base_model.model.<module path>.lora_A.weight`` ([r, in]) and ``.lora_B.weight`` ([out, r]). LoRA on MoE
expert weights (``target_parameters``) is saved under the experts module, A [r*E, in] and B [out, r*E], with
``.base_layer`` inserted as PEFT nests its wrappers (lora/experts.py).
Pickle files (``adapter_model.bin``) are refused: unpickling runs code.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from ..model.files import read_json_object, shown
from ..paths import atomic_dir, atomic_write_json, save_safetensors
from .config import LoraConfig, finite_number, positive_finite, positive_int
from .experts import ExpertLora, expert_shape, expert_weight, peft_key_prefixes, stacked_weight_like
from .layer import LoraLinear, lora_weight_like
from .model import (
    attach_lora,
    delete_adapter,
    layer_scaling,
    linear_paths,
    lora_layers,
    registry,
    require_lora,
    target_parameter_paths,
)

log = logging.getLogger("loraforge")

PREFIX = "base_model.model."
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# adapter_config.json keys, by what they mean for the forward pass. READ: we apply them. INERT: they
# describe training, initialisation or provenance and do not change the maths of a saved adapter.
# REFUSED: they change the maths in a way we do not implement, so a value other than PEFT's "off" is an
# error, never silently ignored. Any other key (PEFT grows new ones) gets a warning, but only when it is
# set to something (PEFT writes every option, almost all of them null or false).
READ_KEYS = {"peft_type", "r", "lora_alpha", "lora_dropout", "target_modules", "use_rslora", "rank_pattern",
             "alpha_pattern", "target_parameters"}
INERT_KEYS = {
    "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping", "peft_version",
    "init_lora_weights", "loftq_config", "eva_config", "corda_config", "lora_ga_config", "megatron_config",
    "megatron_core", "runtime_config", "layers_to_transform", "layers_pattern", "exclude_modules",
    "qalora_group_size", "ensure_weight_tying",
}
REFUSED_KEYS = {  # key -> (PEFT's "off" values, what it is)
    "use_dora": ((False, None), "DoRA (weight-decomposed LoRA)"),
    "fan_in_fan_out": ((False, None), "transposed (Conv1D) base weights"),
    "bias": (("none", None), "trained biases"),
    "lora_bias": ((False, None), "a bias on lora_B"),
    "modules_to_save": ((None, []), "fully trained extra modules"),
    "layer_replication": ((None, []), "replicated layers"),
    "trainable_token_indices": ((None, [], {}), "trainable token embeddings"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "alora_invocation_tokens": ((None, []), "activated LoRA (aLoRA)"),
    "arrow_config": ((None,), "Arrow routing"),
    "use_bdlora": ((False, None), "block-diagonal LoRA"),
    "bdlora_config": ((None,), "block-diagonal LoRA"),
}
KNOWN_KEYS = READ_KEYS | INERT_KEYS | set(REFUSED_KEYS)


def is_set(value) -> bool:
    """Whether an unknown option is switched on: anything but null, false, 0, "" or an empty list/map."""
    return value not in (None, False, 0, "") and value != [] and value != {}


def warn_unknown_keys(raw: dict, known: set[str], where: str) -> None:
    unknown = sorted(k for k in set(raw) - known if is_set(raw[k]))
    if unknown:
        log.warning("%s: ignoring unknown adapter_config keys that are set: %s", where,
                    ", ".join(f"{k}={raw[k]!r}" for k in unknown))


def save_adapter(model: nn.Module, name: str, out_dir: str | Path, base_model_name: str | None = None,
                 dtype: torch.dtype | None = torch.float32) -> Path:
    """Write adapter `name` as a PEFT LoRA folder (atomically: a crash leaves the old folder or none).

    The tensors are written in `dtype`: fp32 by default, as PEFT writes adapters, whatever precision the
    model runs in (None keeps each tensor's own dtype; bf16 halves the file)."""
    reg = registry(model)
    cfg: LoraConfig = reg.configs[require_lora(model, name, "save as a LoRA adapter")]
    tensors, targets, params = {}, set(), {}
    layers = [(path, layer) for path, layer in lora_layers(model) if name in layer.lora_A]
    for path, layer in layers:
        if isinstance(layer, ExpertLora):
            params.setdefault(path.rpartition(".")[0], []).append(layer.param)
    key_of = {f"{experts}.{p}": key for experts, ps in params.items() for p, key in peft_key_prefixes(experts, ps).items()}
    for path, layer in layers:
        for part, t in (("lora_A", layer.lora_A[name]), ("lora_B", layer.lora_B[name])):
            tensors[f"{PREFIX}{key_of.get(path, path)}.{part}.weight"] = t.detach().to("cpu", dtype or t.dtype)
        if not isinstance(layer, ExpertLora):
            targets.add(path.rsplit(".", 1)[-1])
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or base_model_id(model),
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        # The resolved names, not "all-linear": vLLM and older PEFT only read a list.
        "target_modules": sorted(targets) if not isinstance(cfg.targets, str) or cfg.targets == "all-linear"
        else cfg.targets,
        # the adapted expert weights by their last three names ("mlp.experts.down_proj"), sorted as PEFT writes
        "target_parameters": sorted({".".join(p.split(".")[-3:]) for p in key_of}) or None,
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


def base_model_id(model: nn.Module) -> str | None:
    """What PEFT writes as base_model_name_or_path: the hub id of the embedded model, else the absolute
    path of the folder the model was loaded from (our loader never matches a base by this name: shapes
    decide, so adapters saved with the older plain names load as before)."""
    return getattr(model, "base_model_name_or_path", None) or getattr(model, "name_or_path", None)


def read_adapter_config(path: str | Path) -> dict:
    path = Path(path)
    cfg_path = path / CONFIG_FILE
    try:
        if not path.is_dir():
            raise LoraForgeError(f"{shown(path)}: no such adapter folder")
        if not cfg_path.exists():
            raise LoraForgeError(f"{shown(path)}: not an adapter folder (no {CONFIG_FILE})")
    except OSError as e:  # a name too long, a loop of links, no permission
        raise LoraForgeError(f"{shown(path)}: cannot read this adapter folder ({e.strerror or e})") from None
    return read_json_object(cfg_path, "an adapter config")


def read_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = path / WEIGHTS_FILE
    if not weights.exists():
        if (path / "adapter_model.bin").exists():
            raise LoraForgeError(
                f"{shown(path)}: only adapter_model.bin (a pickle) is present; loraforge reads safetensors only, "
                "because unpickling runs code. Re-save it with PEFT's save_pretrained(safe_serialization=True)"
            )
        raise LoraForgeError(f"{shown(path)}: no {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise LoraForgeError(f"{shown(weights)}: corrupt safetensors file ({e})") from None
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise LoraForgeError(f"{shown(weights)}: tensor {key!r} is {t.dtype}, not floating point")
        if not torch.isfinite(t).all():
            raise LoraForgeError(f"{shown(weights)}: tensor {key!r} holds NaN or infinite values")
    return tensors


def lora_config_from_peft(raw: dict, where: str) -> LoraConfig:
    """A LoraConfig from adapter_config.json, every field checked under its JSON name."""
    if raw.get("peft_type", "LORA") != "LORA":
        raise LoraForgeError(f"{where}: peft_type is {raw.get('peft_type')!r}, expected 'LORA'")
    for key, (off, what) in REFUSED_KEYS.items():
        if key in raw and raw[key] not in off:
            raise LoraForgeError(f"{where}: {key}={raw[key]!r} ({what}) is not supported by loraforge")
    warn_unknown_keys(raw, KNOWN_KEYS, where)
    dropout = raw.get("lora_dropout")
    if dropout is not None and not (finite_number(dropout) and 0 <= dropout < 1):
        raise LoraForgeError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(raw.get("use_rslora", False), bool):
        raise LoraForgeError(f"{where}: use_rslora must be true or false, got {raw['use_rslora']!r}")
    try:
        return LoraConfig(
            r=positive_int("rank r", raw.get("r", 8)),
            alpha=positive_finite("lora_alpha", raw.get("lora_alpha", 8)),
            dropout=dropout or 0.0,
            targets=_targets(raw.get("target_modules")),
            use_rslora=raw.get("use_rslora", False),
            rank_pattern=raw.get("rank_pattern") or {},
            alpha_pattern=raw.get("alpha_pattern") or {},
            target_parameters=raw.get("target_parameters"),
        )
    except LoraForgeError as e:
        raise LoraForgeError(f"{where}: {e}") from None


def _targets(value):
    """target_modules as LoraConfig takes it (None means "all-linear"; the loader uses the tensors' modules)."""
    if value is None or value == []:
        return "all-linear"
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return list(value)
    raise LoraForgeError(f"target_modules must be a list of module names or a regex, got {value!r}")


def load_adapter(model: nn.Module, path: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Load a PEFT LoRA folder as adapter `name` (default: the folder's name). Returns the name.

    Everything is checked before the model is touched: a wrong-model adapter, a malformed config, a
    corrupt, non-finite or zero-rank tensor or a pickle leaves the model exactly as it was.
    """
    path = Path(path)
    raw = read_adapter_config(path)
    if raw.get("peft_type") == "PREFIX_TUNING":
        raise LoraForgeError(f"{shown(path)}: a prefix-tuning adapter; load it with "
                             "loraforge.prefix.load_prefix_adapter")
    cfg = lora_config_from_peft(raw, shown(path / CONFIG_FILE))
    name = name or path.resolve().name
    registry(model).check_new_name(name)
    try:
        experts = expert_keys(model, target_parameter_paths(model, cfg.target_parameters, "target_parameters"))
    except LoraForgeError as e:
        raise LoraForgeError(f"{shown(path / CONFIG_FILE)}: {e}") from None
    pairs = _lora_pairs(model, path, read_adapter_tensors(path), raw.get("base_model_name_or_path"), experts)
    # Ranks come from the tensors; alpha (and rsLoRA) from the config, with PEFT's per-module patterns.
    plan, weights = {}, shown(path / WEIGHTS_FILE)
    for mod, (A, B) in pairs.items():
        cfg_r, alpha = cfg.rank_alpha(mod)
        r = A.shape[0] // expert_shape(model, mod)[0] if mod in experts.values() else A.shape[0]
        try:
            layer_scaling(model, mod, cfg, cfg_r, alpha)  # the config's own rank must fit the layer too
            plan[mod] = (r, layer_scaling(model, mod, cfg, r, alpha))
        except LoraForgeError as e:
            raise LoraForgeError(f"{weights}: {e}") from None
        _check_update_fits(_weight_dtype(model, mod, experts), mod, A, B, r, plan[mod][1], weights)
    cfg.targets = sorted(pairs)
    attach_lora(model, name, _exact_targets(cfg), plan, activate=activate)
    try:
        with torch.no_grad():
            for mod, (A, B) in pairs.items():
                layer = model.get_submodule(mod)
                layer.lora_A[name].copy_(A)
                layer.lora_B[name].copy_(B)
                layer.lora_A[name].requires_grad_(False)
                layer.lora_B[name].requires_grad_(False)
    except BaseException:
        delete_adapter(model, name)
        raise
    registry(model).configs[name] = cfg
    return name


def expert_keys(model: nn.Module, param_paths: list[str]) -> dict[str, str]:
    """{the module path PEFT saves a stacked expert weight's LoRA under: that weight's path} (see
    lora/experts.py's peft_key_prefixes)."""
    by_experts: dict[str, list[str]] = {}
    for p in param_paths:
        experts, _, param = p.rpartition(".")
        by_experts.setdefault(experts, []).append(param)
    return {key: f"{experts}.{param}" for experts, params in by_experts.items()
            for param, key in peft_key_prefixes(experts, params).items()}


def _weight_dtype(model: nn.Module, mod: str, experts: dict[str, str]) -> torch.dtype:
    """The dtype the layer (or stacked expert weight) at `mod` computes in."""
    if mod in experts.values():
        return stacked_weight_like(expert_weight(model, mod)).dtype
    layer = model.get_submodule(mod)
    return lora_weight_like(layer.base if isinstance(layer, LoraLinear) else layer).dtype


def _lora_pairs(model: nn.Module, path: Path, tensors: dict[str, torch.Tensor], base_name: str | None,
                experts: dict[str, str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module path: (A [r, in], B [out, r])} from PEFT's keys, each checked against this model's layer.
    A stacked expert weight (`experts`: PEFT's key path -> its path) has A [r*E, in] and B [out, r*E]."""
    weights = shown(path / WEIGHTS_FILE)
    modules = set(linear_paths(model))
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        k = key[len(PREFIX):] if key.startswith(PREFIX) else key
        k = k.replace(".default.weight", ".weight")
        for part in ("lora_A", "lora_B"):
            if k.endswith(f".{part}.weight"):
                found.setdefault(k[: -len(f".{part}.weight")], {})[part] = t
                break
        else:
            raise LoraForgeError(f"{weights}: unsupported tensor {key!r} (only LoRA A/B of linear layers)")
    if not found:
        raise LoraForgeError(f"{weights}: holds no LoRA weights")
    pairs = {}
    for mod, ab in found.items():
        if mod in experts:
            pairs[experts[mod]] = _expert_pair(model, path, experts[mod], ab, base_name)
            continue
        if mod not in modules and (mod.endswith(".experts") or ".experts.base_layer" in mod):
            raise LoraForgeError(f"{weights}: holds LoRA weights of MoE experts ({mod}) that {CONFIG_FILE}'s "
                                 "target_parameters does not name")
        if mod not in modules:
            raise LoraForgeError(
                f"{shown(path)}: adapter targets {mod!r}, which this model does not have: it was made for another "
                f"model ({base_name or 'unknown base'})"
            )
        if set(ab) != {"lora_A", "lora_B"}:
            raise LoraForgeError(f"{weights}: {mod} has only {', '.join(ab)}")
        A, B = ab["lora_A"], ab["lora_B"]
        m = model.get_submodule(mod)
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != m.in_features or B.shape[0] != m.out_features \
                or A.shape[0] != B.shape[1]:
            raise LoraForgeError(
                f"{shown(path)}: {mod} expects lora_A [r, {m.in_features}] and lora_B [{m.out_features}, r], the "
                f"file has {list(A.shape)} and {list(B.shape)}: this adapter was made for another model "
                f"({base_name or 'unknown'})"
            )
        pairs[mod] = (A, B)
    return pairs


def _expert_pair(model: nn.Module, path: Path, param: str, ab: dict[str, torch.Tensor],
                 base_name: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r*E, in], B [out, r*E]) of the stacked expert weight `param`, checked against its shape."""
    if set(ab) != {"lora_A", "lora_B"}:
        raise LoraForgeError(f"{shown(path / WEIGHTS_FILE)}: {param} has only {', '.join(ab)}")
    A, B = ab["lora_A"], ab["lora_B"]
    E, out_f, in_f = expert_shape(model, param)
    if A.dim() != 2 or B.dim() != 2 or A.shape[1] != in_f or B.shape[0] != out_f or A.shape[0] != B.shape[1] \
            or A.shape[0] % E:
        raise LoraForgeError(
            f"{shown(path)}: {param} ({E} experts) expects lora_A [r*{E}, {in_f}] and lora_B [{out_f}, r*{E}], the "
            f"file has {list(A.shape)} and {list(B.shape)}: this adapter was made for another model "
            f"({base_name or 'unknown'})"
        )
    return A, B


def _check_update_fits(dtype: torch.dtype, mod: str, A: torch.Tensor, B: torch.Tensor, r: int, s: float,
                       where: str) -> None:
    """Refuse an update s * B @ A whose entries could overflow the dtype the layer computes in.

    |s * (B @ A)[i, j]| <= s * r * max|B| * max|A|: a cheap bound that finite, sane adapters meet by many
    orders of magnitude, while alpha = 1e300 or weights near the dtype's limit would give inf (then NaN).
    """
    top = torch.finfo(dtype).max
    for t, part in ((A, "lora_A"), (B, "lora_B")):
        if t.abs().max().item() > top:
            raise LoraForgeError(f"{where}: {mod}.{part} has values beyond what {dtype} holds")
    bound = s * r * A.abs().max().item() * B.abs().max().item()
    if not math.isfinite(bound) or bound > top:
        raise LoraForgeError(f"{where}: the update of {mod} (scaling {s:.3g} x rank {r} x the largest A "
                             f"and B entries) could reach {bound:.3g}, beyond what {dtype} holds")


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
        if raw.get("target_parameters"):
            info["target_parameters"] = raw["target_parameters"]
    elif raw.get("peft_type") == "PREFIX_TUNING":
        info.update(num_virtual_tokens=raw.get("num_virtual_tokens"))
    return info


def save_merged(model: nn.Module, tokenizer, out_dir: str | Path, adapter: str | None = None) -> Path:
    """Write base + s*BA as a plain Hugging Face model folder (fp32/bf16 as the base; never re-quantized)."""
    from .merge_export import write_merged_folder

    return write_merged_folder(model, tokenizer, out_dir, adapter)


__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "adapter_info", "save_merged", "atomic_dir"]
