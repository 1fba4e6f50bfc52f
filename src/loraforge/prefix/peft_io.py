"""Prefix adapters in PEFT's PREFIX_TUNING format, so PEFT reads ours and we read theirs.

A folder holds ``adapter_config.json`` (peft_type "PREFIX_TUNING", num_virtual_tokens, num_layers and,
for grouped-query models, token_dim = Hkv * head_dim with num_attention_heads = Hkv: PEFT sizes the
prefix by the key/value heads) and ``adapter_model.safetensors`` with one tensor, ``prompt_embeddings``
[num_virtual_tokens, num_layers * 2 * token_dim]. An MLP reparameterisation is never saved, only its
output, which is why our configs say prefix_projection=false (PEFT itself saves the folded table too).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from ..lora.config import positive_int
from ..lora.model import delete_adapter, registry
from ..lora.peft_io import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    base_model_id,
    read_adapter_config,
    read_adapter_tensors,
    warn_unknown_keys,
)
from ..paths import atomic_dir, atomic_write_json, save_safetensors
from .config import PrefixConfig
from .module import add_prefix, is_prefix_adapter, prefix_adapters

KEY = "prompt_embeddings"
KNOWN_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "num_virtual_tokens",
    "token_dim", "num_transformer_submodules", "num_attention_heads", "num_layers", "encoder_hidden_size",
    "prefix_projection", "init_weights", "modules_to_save", "auto_mapping", "peft_version",
}


def save_prefix_adapter(model: nn.Module, name: str, out_dir: str | Path, base_model_name: str | None = None) -> Path:
    """Write prefix adapter `name` as a PEFT folder (atomically), the MLP (if any) folded into the table."""
    if not is_prefix_adapter(model, name):
        raise LoraForgeError(f"no prefix adapter named {name!r}")
    enc = prefix_adapters(model)[name]
    with torch.no_grad():
        table = enc.flat().detach().float().cpu().contiguous()  # [P, L * 2 * Hkv * D]
    if not torch.isfinite(table).all():
        raise LoraForgeError(f"refusing to save prefix adapter {name!r}: it has non-finite values")
    config = {
        "peft_type": "PREFIX_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name or base_model_id(model),
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": enc.num_virtual_tokens,
        "token_dim": enc.token_dim,
        "num_transformer_submodules": 1,
        "num_attention_heads": enc.n_kv,
        "num_layers": enc.n_layers,
        "encoder_hidden_size": enc.token_dim,
        "prefix_projection": False,  # folded: the file holds the prefix itself
        "init_weights": None,
        "modules_to_save": None,
    }
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_safetensors({KEY: table}, tmp / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_json(tmp / CONFIG_FILE, config)
    return out_dir


def load_prefix_adapter(model: nn.Module, path: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Load a PEFT prefix-tuning folder as adapter `name` (default: the folder's name), frozen. Returns the name.

    Everything is checked before the model is touched: an adapter for another model, a corrupt file or a
    pickle leaves the model exactly as it was.
    """
    path = Path(path)
    raw = read_adapter_config(path)
    where = path / CONFIG_FILE
    if raw.get("peft_type") != "PREFIX_TUNING":
        raise LoraForgeError(f"{where}: peft_type is {raw.get('peft_type')!r}, expected 'PREFIX_TUNING'")
    warn_unknown_keys(raw, KNOWN_KEYS, str(where))
    if raw.get("task_type") not in (None, "CAUSAL_LM"):
        raise LoraForgeError(f"{where}: task_type {raw['task_type']!r} is not supported (only CAUSAL_LM)")
    if raw.get("num_transformer_submodules", 1) not in (1, None):
        raise LoraForgeError(f"{where}: num_transformer_submodules={raw['num_transformer_submodules']!r} is for "
                             "encoder-decoder models; only decoder-only (1) is supported")
    if raw.get("modules_to_save"):
        raise LoraForgeError(f"{where}: modules_to_save={raw['modules_to_save']!r} is not supported")
    cfg = model.config
    L, Hkv, D = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    base = raw.get("base_model_name_or_path") or "an unknown base"
    for key, ours in (("num_layers", L), ("token_dim", Hkv * D), ("num_attention_heads", Hkv)):
        theirs = raw.get(key)
        if theirs is not None and theirs != ours:
            raise LoraForgeError(f"{where}: {key}={theirs!r} but this model needs {ours}: the adapter was made for "
                                 f"another model ({base})")
    if "num_virtual_tokens" not in raw:
        raise LoraForgeError(f"{where}: num_virtual_tokens is missing")
    try:
        P = positive_int("num_virtual_tokens", raw["num_virtual_tokens"])
    except LoraForgeError as e:
        raise LoraForgeError(f"{where}: {e}") from None
    tensors = read_adapter_tensors(path)
    weights = path / WEIGHTS_FILE
    if set(tensors) != {KEY}:
        raise LoraForgeError(f"{weights}: expected exactly one tensor {KEY!r}, found {sorted(tensors)}")
    table = tensors[KEY]
    if tuple(table.shape) != (P, L * 2 * Hkv * D):
        raise LoraForgeError(f"{weights}: {KEY} has shape {list(table.shape)} but this model needs "
                             f"[{P}, {L * 2 * Hkv * D}] ({P} virtual tokens x {L} layers x 2 x {Hkv} kv heads x {D}): "
                             f"the adapter was made for another model ({base})")
    if not table.is_floating_point() or not torch.isfinite(table).all():
        raise LoraForgeError(f"{weights}: {KEY} must hold finite floating-point values")
    # the attention casts the prefix to the keys' dtype: a value fp32 holds may be inf in fp16
    dtype = model.model.embed_tokens.weight.dtype
    if table.abs().max().item() > torch.finfo(dtype).max:
        raise LoraForgeError(f"{weights}: {KEY} has values beyond what this model's {dtype} holds")
    name = name or path.resolve().name
    if name in registry(model).configs:
        raise LoraForgeError(f"an adapter named {name!r} is already loaded")
    enc = add_prefix(model, name, PrefixConfig(num_virtual_tokens=P, init="zero"), activate=activate)
    try:
        with torch.no_grad():
            enc.embedding.copy_(table)
        enc.requires_grad_(False)
    except BaseException:
        delete_adapter(model, name)
        raise
    return name
