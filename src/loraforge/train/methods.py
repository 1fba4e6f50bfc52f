"""The one place a training method is chosen: what it adds to the base model, what the optimizer trains,
what each batch's forward needs, and how the adapter is saved.

    model, tok = load_model(src, quantize=base_quantization(cfg.method))
    trainable = prepare(model, cfg)                      # adapters added, everything else frozen
    loss = model(**batch, **trainable.batch_kwargs(batch))
    trainable.save(out_dir)                              # a PEFT-format adapter folder

A new method (prefix tuning) adds a branch to `prepare` that returns a `Trainable`; the trainer,
checkpoints and resume work from `Trainable.params` alone and need no change.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import LoraForgeError

ADAPTER = "default"  # PEFT's name for a model's only adapter


def _no_extra(batch: dict[str, Any]) -> dict[str, Any]:  # noqa: ARG001
    return {}


@dataclass
class Trainable:
    method: str
    # The trained tensors by a stable name: checkpoints store and restore exactly these.
    params: dict[str, nn.Parameter]
    # Writes the adapter as a PEFT folder at the given path (atomically) and returns the path.
    save: Callable[[Path], Path]
    # Extra or replacing keyword arguments for model(...) given the collated batch (input_ids, labels,
    # positions, attention_mask); e.g. prefix tuning passes prefix= and widens the attention mask.
    batch_kwargs: Callable[[dict[str, Any]], dict[str, Any]] = field(default=_no_extra)


def base_quantization(method: str) -> str | None:
    """How the frozen base is loaded: QLoRA = NF4 with double quantization, then LoRA on top."""
    return "nf4" if method == "qlora" else None


def prepare(model: nn.Module, cfg) -> Trainable:
    """Add `cfg.method`'s adapter to a freshly loaded (frozen) model and unfreeze only it."""
    if cfg.method in ("lora", "qlora"):
        return _prepare_lora(model, cfg)
    if cfg.method == "prefix":
        try:
            from ..prefix import prepare_prefix_training  # noqa: PLC0415 - optional until prefix tuning lands
        except ImportError:
            raise LoraForgeError("method 'prefix': prefix tuning is not available in this build of loraforge") from None
        return prepare_prefix_training(model, cfg)
    raise LoraForgeError(f"method {cfg.method!r}: choose lora, qlora or prefix")


def _prepare_lora(model: nn.Module, cfg) -> Trainable:
    from ..lora import LoraConfig, add_lora, get_adapter_params, save_adapter, set_trainable_params

    add_lora(model, ADAPTER, LoraConfig(r=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, targets=cfg.targets,
                                          target_parameters=cfg.target_parameters))
    set_trainable_params(model, ADAPTER)
    return Trainable(
        method=cfg.method,
        params=get_adapter_params(model, ADAPTER),
        save=lambda out: save_adapter(model, ADAPTER, out, dtype=getattr(torch, cfg.save_dtype)),
    )
