"""The per-model record of adapters: their order (for per-row ids), configs, which is active and merged.

One object is shared by every LoRA layer of a model, so switching adapters is one assignment here.
Prefix adapters (loraforge.prefix) are recorded here too, with a PrefixConfig, so "the active adapter"
means the same for both kinds: set_adapter, disable_adapter and delete_adapter work on either.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import LoraForgeError

# Adapter names key nn.ParameterDict / nn.ModuleDict entries, which are module attributes too: a name such
# as "_parameters" or "forward" would overwrite or collide with the container's own machinery. Names are
# kept to a plain pattern (no '.', which separates module paths) and off the containers' attribute names.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = ("1 to 64 letters, digits, '-' or '_', starting with a letter or digit, and not an attribute "
             "name of a torch module such as 'forward', 'to' or 'keys'")
_RESERVED = frozenset(dir(nn.ParameterDict())) | frozenset(dir(nn.ModuleDict()))


def check_adapter_name(name: object) -> None:
    """Refuse a name that cannot safely key an adapter (see NAME_RULE)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or name in _RESERVED:
        raise LoraForgeError(f"adapter name {name!r} is not allowed: an adapter name is {NAME_RULE}")


@dataclass
class AdapterRegistry:
    names: list[str] = field(default_factory=list)  # adapter_ids index into this list
    configs: dict[str, Any] = field(default_factory=dict)
    active: str | None = None
    merged: str | None = None

    def check_new_name(self, name: str) -> None:
        """Refuse a name that is taken or that cannot safely key an adapter (LoRA and prefix alike)."""
        check_adapter_name(name)
        if name in self.configs:
            raise LoraForgeError(f"an adapter named {name!r} already exists; delete it first or pick another name")
