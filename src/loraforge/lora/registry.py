"""The per-model record of adapters: their order (for per-row ids), configs, which is active and merged.

One object is shared by every LoRA layer of a model, so switching adapters is one assignment here.
Prefix adapters (loraforge.prefix) are recorded here too, with a PrefixConfig, so "the active adapter"
means the same for both kinds: set_adapter, disable_adapter and delete_adapter work on either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class AdapterRegistry:
    names: list[str] = field(default_factory=list)  # adapter_ids index into this list
    configs: dict[str, Any] = field(default_factory=dict)
    active: str | None = None
    merged: str | None = None
