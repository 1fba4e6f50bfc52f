"""LoraConfig: what an adapter is, validated when it is built."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from ..errors import LoraForgeError


@dataclass
class LoraConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    # A list of module names (matched as the last name components, PEFT's rule), a regex string (full
    # match against the whole module path), or "all-linear" (every linear layer but the output head).
    targets: list[str] | str = "all-linear"
    use_rslora: bool = False
    init: str = "kaiming"  # or "gaussian"
    # Per-module overrides, keyed by a regex searched in the module path (PEFT's rank_pattern/alpha_pattern).
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise LoraForgeError(f"rank r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and self.alpha > 0):
            raise LoraForgeError(f"alpha must be positive, got {self.alpha!r}")
        if not (0.0 <= float(self.dropout) < 1.0):
            raise LoraForgeError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise LoraForgeError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            try:
                re.compile(self.targets)
            except re.error as e:
                raise LoraForgeError(f"targets: {self.targets!r} is not a valid regex ({e})") from None
        elif isinstance(self.targets, (list, tuple)):
            if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
                raise LoraForgeError(f"targets must be a non-empty list of module names, got {self.targets!r}")
            self.targets = list(self.targets)

    def rank_alpha(self, module_path: str) -> tuple[int, float]:
        r, alpha = self.r, float(self.alpha)
        for pat, v in self.rank_pattern.items():
            if re.search(pat, module_path):
                r = int(v)
                break
        for pat, v in self.alpha_pattern.items():
            if re.search(pat, module_path):
                alpha = float(v)
                break
        return r, alpha

    def scaling(self, r: int, alpha: float) -> float:
        # rsLoRA (Kalajdzievski 2023): alpha / sqrt(r) keeps the update's scale stable as r grows.
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def matches(self, module_path: str) -> bool:
        if self.targets == "all-linear":
            return module_path.rsplit(".", 1)[-1] != "lm_head"
        if isinstance(self.targets, str):
            return re.fullmatch(self.targets, module_path) is not None
        return any(module_path == t or module_path.endswith("." + t) for t in self.targets)
