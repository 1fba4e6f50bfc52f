"""CompareConfig: one comparison's settings, shared by every method so that only the method differs.

Every adapter row is trained by `loraforge.train.train` from `train_config(method)`: the same data,
split, seed, batch size and step budget; only the method and its learning rate change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import LoraForgeError
from ..train.config import METHODS, TrainConfig, default_lr

FULL = "full"  # the full fine-tuning reference row (not a TrainConfig method)
BASE = "base"  # the untrained base model: the anchor every trained row is read against

# Peak learning rates: `loraforge train`'s defaults for the adapter methods (one definition, so a compare
# row is the run `train` would make), and for full fine-tuning, which moves every weight, a step ~4x
# smaller than LoRA's.
DEFAULT_LR = {**{m: default_lr(m) for m in METHODS}, FULL: 5e-5}

LABELS = {BASE: "base model (no training)", "lora": "LoRA", "qlora": "QLoRA (NF4 base)", "prefix": "prefix tuning",
          FULL: "full fine-tuning"}


@dataclass
class CompareConfig:
    data: str
    out: str | None = None  # default: runs/compare-<data file stem>
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    full: bool = True  # add the full fine-tuning reference row (trained if it fits in memory)
    model: str | None = None
    device: str | None = None
    # 30 steps: all five rows on the embedded model, examples/dates.jsonl and --val dates_test.jsonl took
    # 7.0 minutes on 2 idle cores (2.1 s per LoRA step, batch 8 x ~54 tokens; exact match included).
    max_steps: int = 30
    lr: dict[str, float] = field(default_factory=dict)  # per-row overrides of DEFAULT_LR
    batch_size: int = 8
    seed: int = 0
    rank: int = 16
    alpha: float = 32.0
    num_virtual_tokens: int = 20
    format: str | None = None
    max_len: int = 1024
    train_on_prompt: bool = False
    val: str | None = None
    val_split: float = 0.1
    eval_every: int | None = None  # default: 5 evaluations over the run
    exact_match: bool = True  # greedy exact match on the validation records that have a reference
    timeout: float = 3600.0  # seconds per method's worker process

    def __post_init__(self):
        if not self.methods:
            raise LoraForgeError(f"--methods: give at least one of {', '.join(METHODS)}")
        for m in self.methods:
            if m not in METHODS:
                hint = " (full fine-tuning is the reference row; it is on unless --no-full)" if m == FULL else ""
                raise LoraForgeError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}{hint}")
        if len(set(self.methods)) != len(self.methods):
            raise LoraForgeError(f"--methods: a method is listed twice in {','.join(self.methods)}")
        if self.max_steps < 1:
            raise LoraForgeError(f"--max-steps {self.max_steps}: must be at least 1")
        for k, v in self.lr.items():
            if k not in (*METHODS, FULL):
                raise LoraForgeError(f"--lr: unknown method {k!r}; use METHOD=LR with one of "
                                     f"{', '.join((*METHODS, FULL))}")
            if not (v > 0 and math.isfinite(v)):
                raise LoraForgeError(f"--lr: {k}={v} must be a positive number")
        if self.eval_every is not None and self.eval_every < 0:
            raise LoraForgeError(f"--eval-every {self.eval_every}: must be 0 or more")
        if not self.timeout > 0:
            raise LoraForgeError(f"--timeout {self.timeout}: must be positive")
        for m in self.methods:  # the trainer's own checks (rank, format, val_split, ...) before any work starts
            self.train_config(m)

    # -- derived values ---------------------------------------------------------------------------------------
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path("runs") / f"compare-{Path(self.data).stem}"

    def rows(self) -> list[str]:
        """The rows in the order they run: the base anchor, the methods, then full fine-tuning."""
        return [BASE, *self.methods, *([FULL] if self.full else [])]

    def lr_for(self, row: str) -> float | None:
        if row == BASE:
            return None
        return self.lr.get(row, DEFAULT_LR[row])

    def evals_every(self) -> int:
        return self.eval_every if self.eval_every is not None else max(1, self.max_steps // 5)

    def train_config(self, method: str) -> TrainConfig:
        return TrainConfig(
            data=self.data, out=str(self.out_dir() / method), model=self.model, device=self.device, method=method,
            dtype="float32",  # every row, full fine-tuning included, in one precision
            rank=self.rank, alpha=self.alpha, num_virtual_tokens=self.num_virtual_tokens, max_steps=self.max_steps,
            lr=self.lr_for(method), batch_size=self.batch_size, seed=self.seed, format=self.format,
            max_len=self.max_len, train_on_prompt=self.train_on_prompt, val=self.val, val_split=self.val_split,
            eval_every=self.evals_every(), save_every=0, keep_checkpoints=1,
        )

    # -- to and from the worker processes ---------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CompareConfig:
        return cls(**d)


def parse_lr(value: str | None) -> dict[str, float]:
    """`--lr 1e-3` (every row) or `--lr prefix=1e-2,full=2e-5` (those rows; the rest keep their defaults)."""
    if not value:
        return {}
    try:
        if "=" not in value:
            v = float(value)
            return dict.fromkeys((*METHODS, FULL), v)
        out = {}
        for part in value.split(","):
            k, v = part.split("=", 1)
            out[k.strip()] = float(v)
        return out
    except ValueError:
        raise LoraForgeError(f"--lr {value!r}: give a number (every method) or METHOD=LR pairs, "
                             "e.g. prefix=1e-2,full=2e-5") from None
