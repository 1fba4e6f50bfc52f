"""What a worker measures about the model it trained: parameters, bytes held, bytes on disk, peak memory,
step times, and the same validation records for every row.

Everything here reads real tensors, files or kernel counters; nothing is computed from a formula.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from torch import nn

from ..lora.peft_io import CONFIG_FILE, WEIGHTS_FILE


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)  # a tied weight once


def held_weight_bytes(model: nn.Module, frozen_only: bool = True) -> int:
    """Bytes of the model's weights as they sit in memory: a QuantLinear's packed codes, scales and nested
    scales (`quantized_nbytes`), every other weight's tensor bytes; a tied weight once. With frozen_only,
    the trained tensors (adapters, or everything for full fine-tuning) are left out."""
    from ..quant import QuantLinear, quantized_nbytes

    n = sum(quantized_nbytes(m) for m in model.modules() if isinstance(m, QuantLinear))
    return n + sum(p.nbytes for p in model.parameters() if not (frozen_only and p.requires_grad))


def adapter_bytes(folder: Path) -> int:
    """Bytes on disk of the adapter a run left in `folder` (PEFT's weights file and its config)."""
    return sum((Path(folder) / f).stat().st_size for f in (WEIGHTS_FILE, CONFIG_FILE))


def step_stats(records: list[dict[str, Any]]) -> dict[str, float | None]:
    """Median seconds per optimizer step and tokens per second, leaving out step 1 (allocator warm-up,
    lazy initialisation), from the per-step records of metrics.jsonl (cumulative `tokens`, `tokens_per_s`)."""
    steps = [r for r in records if "loss" in r and r.get("tokens_per_s")]
    n_tokens, seconds, before = [], [], 0
    for r in steps:
        n = r["tokens"] - before
        before = r["tokens"]
        n_tokens.append(n)
        seconds.append(n / r["tokens_per_s"])  # the trainer logs tokens / step time for each step
    if not seconds:
        return {"step_s": None, "tokens_per_s": None}
    first = 1 if len(seconds) > 1 else 0
    return {"step_s": statistics.median(seconds[first:]), "tokens_per_s": sum(n_tokens[first:]) / sum(seconds[first:])}


def read_split(cfg) -> tuple[list, list]:
    """(train records, validation records) exactly as the trainer splits them for these settings, so the
    base row and full fine-tuning see the records the adapters were trained and validated on."""
    from ..train.trainer import read_data

    return read_data(cfg.train_config(cfg.methods[0]))
