"""What every benchmark worker shares: the setting, the data, the LoRA initialisation, memory and timing.

Each measured system runs in its own process (see ``worker.py``), so these helpers are written to be
called from any of them and to give both sides of a comparison the same inputs bit for bit.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass

import torch

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Setting:
    """One benchmark configuration; the full run and `--quick` differ only in these numbers."""

    model: str | None = None  # None = the embedded SmolLM2-135M-Instruct
    batch: int = 4
    seq: int = 256
    steps: int = 7
    timed_from: int = 3  # median over steps timed_from..steps (1-based)
    r: int = 16
    alpha: float = 32.0
    threads: int = 2
    lr: float = 1e-4
    seed: int = 0
    gen_tokens: int = 64
    gen_prompt: int = 32
    gen_batches: tuple[int, ...] = (1, 8)
    quant_numel: int = 1536 * 576 * 8  # elements quantized per throughput rep (8 MLP matrices' worth)
    quant_reps: int = 5
    rate_seconds: float = 2.0  # matmul-rate reps per shape
    grad_checkpointing: bool = False
    quick: bool = False
    nice: int = 0  # workers' scheduling priority (negative = ahead of background processes; needs root)
    lockstep: bool = False  # steps are started by the runner, alternating with the anchor's (see runner.py)

    @classmethod
    def tiny(cls, model: str | None = None) -> Setting:
        return cls(model=model, batch=2, seq=32, steps=3, timed_from=2, r=4, alpha=8.0, gen_tokens=4,
                   gen_prompt=8, gen_batches=(1, 2), quant_numel=64 * 1024, quant_reps=2, quick=True,
                   rate_seconds=0.1)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Setting:
        d = dict(d)
        d["gen_batches"] = tuple(d["gen_batches"])
        return cls(**d)


def setup_process(s: Setting) -> None:
    torch.set_num_threads(s.threads)
    torch.manual_seed(s.seed)


def model_folder(s: Setting):
    from ..model import resolve_source

    return resolve_source(s.model).folder


def batches(s: Setting, vocab: int) -> list[torch.Tensor]:
    """`steps` batches of token ids [batch, seq]; labels are the ids themselves (next-token loss)."""
    g = torch.Generator().manual_seed(s.seed + 1)
    return [torch.randint(0, vocab, (s.batch, s.seq), generator=g) for _ in range(s.steps)]


def lora_init(shapes: dict[str, tuple[int, int]], r: int, seed: int, b_std: float = 0.0):
    """{module path: (A [r, in], B [out, r])}, the same for any process given the same paths and seed.

    A is Kaiming-uniform as both libraries draw it, from a generator seeded per module (so the result
    does not depend on iteration order); B is zero for training (a step-0 adapter is the identity) or
    small Gaussian noise when a benchmark needs an adapter that changes the output (generation).
    """
    out = {}
    for path in sorted(shapes):
        o, i = shapes[path]
        g = torch.Generator().manual_seed(seed * 1_000_003 + sum(map(ord, path)) * 7919 + len(path))
        bound = 1.0 / math.sqrt(i)  # kaiming_uniform_(a=sqrt(5)) on [r, in]
        A = (torch.rand(r, i, generator=g) * 2 - 1) * bound
        B = torch.randn(o, r, generator=g) * b_std if b_std else torch.zeros(o, r)
        out[path] = (A, B)
    return out


def rss_bytes() -> dict[str, int]:
    """Current and peak resident set size of this process (VmRSS / VmHWM), in bytes."""
    vals = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                k, v = line.split(":")
                vals[k] = int(v.split()[0]) * 1024
    return {"rss": vals.get("VmRSS", 0), "peak": vals.get("VmHWM", 0)}


def reset_peak_rss() -> bool:
    """Make VmHWM restart from the current RSS (Linux clear_refs 5), to measure one phase's peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class StepTimer:
    """Wall and process-CPU seconds per step; the CPU time shows when other processes stole the cores."""

    def __init__(self):
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __enter__(self):
        self._w, self._c = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall.append(time.perf_counter() - self._w)
        self.cpu.append(time.process_time() - self._c)

    def median(self, first: int) -> float:
        """Median wall seconds over steps first.. (1-based)."""
        return statistics.median(self.wall[first - 1:])


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")
