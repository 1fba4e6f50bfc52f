"""The learning-rate schedule: linear warm-up, then cosine decay to zero.

A pure function of the step, so resuming needs no scheduler state beyond the step itself.
"""

from __future__ import annotations

import math


def default_warmup(total_steps: int) -> int:
    """5% of the run: long enough to keep Adam's first, noisy moment estimates from taking big steps."""
    return round(0.05 * total_steps)


def lr_at(step: int, base_lr: float, warmup: int, total: int) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total`."""
    if step < warmup:
        return base_lr * (step + 1) / warmup  # reaches base_lr on the last warm-up step, never 0
    progress = (step - warmup) / max(1, total - warmup)  # in [0, 1)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
