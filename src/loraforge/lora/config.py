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
    # PEFT's target_parameters: stacked MoE expert weights to adapt, matched as the last name components of
    # their paths (``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``; see lora/experts.py). Needs
    # dropout 0, as PEFT does.
    target_parameters: list[str] | None = None

    def __post_init__(self):
        # Every field is checked here, so a config from Python, YAML or adapter_config.json that is
        # built at all is safe to apply: no layer is wrapped before all of it is known to be valid.
        self.r = positive_int("rank r", self.r)
        self.alpha = positive_finite("alpha", self.alpha)
        if not finite_number(self.dropout) or not 0.0 <= self.dropout < 1.0:
            raise LoraForgeError(f"dropout must be a number in [0, 1), got {self.dropout!r}")
        if not isinstance(self.use_rslora, bool):
            raise LoraForgeError(f"use_rslora must be true or false, got {self.use_rslora!r}")
        if self.init not in ("kaiming", "gaussian"):
            raise LoraForgeError(f"init must be 'kaiming' or 'gaussian', got {self.init!r}")
        if self.target_parameters is not None:
            if not isinstance(self.target_parameters, (list, tuple)) or not all(
                    isinstance(t, str) and t for t in self.target_parameters):
                raise LoraForgeError(f"target_parameters must be a list of parameter names, "
                                     f"got {self.target_parameters!r}")
            self.target_parameters = list(self.target_parameters) or None
        if self.target_parameters and self.dropout != 0:
            raise LoraForgeError(f"dropout must be 0 with target_parameters (got {self.dropout!r}): LoRA on expert "
                                 "weights has no dropout, and PEFT refuses such an adapter")
        if isinstance(self.targets, str) and self.targets != "all-linear":
            check_regex("targets", self.targets)
        elif isinstance(self.targets, (list, tuple)):
            # an empty list adapts no module: only with target_parameters, as in PEFT (target_modules=[])
            if (not self.targets and not self.target_parameters) or not all(isinstance(t, str) and t for t in self.targets):
                raise LoraForgeError(f"targets must be a non-empty list of module names, got {self.targets!r}")
            self.targets = list(self.targets)
        elif not isinstance(self.targets, str):
            raise LoraForgeError(f"targets must be a list of module names, a regex or 'all-linear', "
                                 f"got {self.targets!r}")
        self.rank_pattern = _pattern("rank_pattern", self.rank_pattern, positive_int)
        self.alpha_pattern = _pattern("alpha_pattern", self.alpha_pattern, positive_finite)

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

    def matches_parameter(self, param_path: str) -> bool:
        """Whether target_parameters selects the parameter at `param_path` (PEFT's rule: a full path or its tail)."""
        return any(param_path == t or param_path.endswith("." + t) for t in self.target_parameters or ())


def finite_number(v) -> bool:
    """A real int or float (not a bool, not a string) that is neither infinite nor NaN."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(field: str, v) -> int:
    # JSON has one number type: 8.0 is accepted as 8; 1e999 (inf), 0.5 and "8" are not
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LoraForgeError(f"{field} must be a positive integer, got {v!r}")
    return v


def positive_finite(field: str, v) -> float:
    if not finite_number(v) or v <= 0:
        raise LoraForgeError(f"{field} must be a positive finite number, got {v!r}")
    return v


def check_regex(field: str, pattern) -> None:
    if not isinstance(pattern, str):
        raise LoraForgeError(f"{field}: {pattern!r} is not a regex string")
    try:
        re.compile(pattern)
    except re.error as e:
        raise LoraForgeError(f"{field}: {pattern!r} is not a valid regex ({e})") from None


def _pattern(field: str, patterns, value) -> dict:
    """{regex: value} with every regex compiled and every value checked (`value(field, v)` converts)."""
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise LoraForgeError(f"{field} must be a mapping of module-path regex to value, got {patterns!r}")
    out = {}
    for pat, v in patterns.items():
        check_regex(field, pat)
        out[pat] = value(f"{field}[{pat!r}]", v)
    return out
