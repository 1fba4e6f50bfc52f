"""Attach any adapter folder (LoRA or prefix tuning, PEFT format) to a loaded model by name."""

from __future__ import annotations

from pathlib import Path

from .lora.peft_io import load_adapter, read_adapter_config


def adapter_kind(path: str | Path) -> str:
    return str(read_adapter_config(path).get("peft_type", "LORA"))


def attach_adapter(model, path: str | Path, name: str | None = None, activate: bool = True) -> str:
    """Load the adapter at `path` as `name` and (by default) make it the active one. Returns the name."""
    kind = adapter_kind(path)
    if kind == "PREFIX_TUNING":
        from .prefix import load_prefix_adapter  # noqa: PLC0415 - optional until prefix tuning is used

        return load_prefix_adapter(model, path, name, activate=activate)
    return load_adapter(model, path, name, activate=activate)
