"""The per-model record of adapters: their order (for per-row ids), configs, which is active and merged.

One object is shared by every LoRA layer of a model, so switching adapters is one assignment here.
Prefix adapters (loraforge.prefix) are recorded here too, with a PrefixConfig, so "the active adapter"
means the same for both kinds: set_adapter, disable_adapter and delete_adapter work on either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraForgeError


@dataclass
class AdapterRegistry:
    names: list[str] = field(default_factory=list)  # adapter_ids index into this list
    configs: dict[str, Any] = field(default_factory=dict)
    active: str | None = None
    merged: str | None = None

    def check_new_name(self, name: str) -> None:
        """Refuse a name that is taken or that cannot be a module-path component (LoRA and prefix alike)."""
        if name in self.configs:
            raise LoraForgeError(f"an adapter named {name!r} already exists; delete it first or pick another name")
        if not name or "." in name:
            raise LoraForgeError(f"adapter name {name!r} must be non-empty and contain no '.'")
