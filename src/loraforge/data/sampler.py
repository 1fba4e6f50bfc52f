"""Deterministic batch order with an explicit, saveable position, for exact resume.

The order of epoch e is a pure function of (seed, e), so the state that matters is just where we are:
(epoch, step). A trainer saves `state_dict()` with its checkpoint and, after `load_state_dict()`,
gets exactly the batch that would have come next. No DataLoader, no worker processes, no hidden RNG.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import LoraForgeError
from .encode import Example


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[list[int]]:
    """Indices of epoch `epoch`'s batches: a permutation seeded by (seed, epoch), cut into batch_size
    pieces (the last may be shorter)."""
    if batch_size < 1:
        raise LoraForgeError(f"batch_size {batch_size}: must be at least 1")
    order = np.random.default_rng([seed, epoch]).permutation(n).tolist() if shuffle else list(range(n))
    return [order[i: i + batch_size] for i in range(0, n, batch_size)]


class Batcher:
    """Hands out batches (lists of Examples) epoch after epoch; `step` counts batches done this epoch."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int = 0, shuffle: bool = True):
        if not examples:
            raise LoraForgeError("no training examples to batch")
        self.examples, self.batch_size, self.seed, self.shuffle = examples, batch_size, seed, shuffle
        self.epoch, self.step = 0, 0
        self._plan_epoch, self._plan = -1, []

    def __len__(self) -> int:
        """Batches per epoch."""
        return -(-len(self.examples) // self.batch_size)

    def plan(self) -> list[list[int]]:
        if self._plan_epoch != self.epoch:
            self._plan = batches(len(self.examples), self.batch_size, self.seed, self.epoch, self.shuffle)
            self._plan_epoch = self.epoch
        return self._plan

    def next_batch(self) -> list[Example]:
        """The next batch, moving on to the next epoch when this one is done."""
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        idx = self.plan()[self.step]
        self.step += 1  # counted before the caller trains on it: a state saved afterwards resumes after it
        return [self.examples[i] for i in idx]

    def __iter__(self) -> Iterator[list[Example]]:
        """The rest of the current epoch (all of the next one if this one is finished)."""
        if self.step >= len(self):
            self.epoch, self.step = self.epoch + 1, 0
        epoch = self.epoch
        while self.epoch == epoch and self.step < len(self):
            yield self.next_batch()

    def state_dict(self) -> dict[str, int | bool]:
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "n": len(self.examples),
                "batch_size": self.batch_size, "shuffle": self.shuffle}

    def load_state_dict(self, state: dict[str, int | bool]) -> None:
        mine = self.state_dict()
        for k in ("seed", "n", "batch_size", "shuffle"):
            if state.get(k) != mine[k]:
                raise LoraForgeError(
                    f"cannot resume the data order: the checkpoint has {k}={state.get(k)!r}, this run {mine[k]!r}; "
                    "resume with the same data, batch size, packing and seed"
                )
        try:
            self.epoch, self.step = int(state["epoch"]), int(state["step"])
        except (KeyError, TypeError, ValueError):
            raise LoraForgeError("cannot resume the data order: the checkpoint's sampler state has no valid epoch "
                                 "and step; delete the checkpoint to resume from an earlier one") from None
