"""DIR/metrics.jsonl: one JSON object per training step or evaluation, appended as the run goes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..paths import atomic_write_text


class MetricsLog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []

    def start(self, resume_step: int | None) -> None:
        """A fresh log, or (resuming) the old one cut back to what the checkpoint at `resume_step` knew:
        a killed run may have logged steps past its last checkpoint, and they are about to be redone."""
        if resume_step is not None and self.path.exists():
            self.records = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        else:
            self.records = []
        atomic_write_text(self.path, "".join(_line(r) for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(_line(record))

    def train_losses(self) -> tuple[list[int], list[float]]:
        rows = [(r["step"], r["loss"]) for r in self.records if "loss" in r]
        return [s for s, _ in rows], [v for _, v in rows]

    def val_losses(self) -> tuple[list[int], list[float]]:
        rows = [(r["step"], r["val_loss"]) for r in self.records if "val_loss" in r]
        return [s for s, _ in rows], [v for _, v in rows]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill ends the log
    return out


def _line(record: dict[str, Any]) -> str:
    # JSON has no NaN/inf: write them as null rather than produce a file other tools reject
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    return json.dumps(clean) + "\n"
