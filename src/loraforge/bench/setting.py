"""What every benchmark worker shares: the setting, the data, the LoRA initialisation and timing.

Each measured system runs in its own process (see ``worker.py``), so these helpers are written to be
called from any of them and to give both sides of a comparison the same inputs bit for bit.
"""

from __future__ import annotations

import math
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
    dropout: float = 0.05  # the default users train with (and what selects the fused path must handle)
    dtype: str = "float32"  # loraforge's --dtype for the base (auto: bf16 where the CPU multiplies it fast)
    autocast: bool = False  # PEFT's rows: fp32 weights under torch.autocast("cpu", bfloat16)
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


def add_ours(model, s: Setting, b_std: float = 0.0) -> None:
    """Add loraforge's adapter "bench" (r, alpha of the setting, every target) with lora_init's weights."""
    from ..lora import LoraConfig, add_lora, lora_layers

    add_lora(model, "bench", LoraConfig(r=s.r, alpha=s.alpha, dropout=s.dropout, targets=list(TARGETS)))
    layers = dict(lora_layers(model))
    init = lora_init({p: (m.out_features, m.in_features) for p, m in layers.items()}, s.r, s.seed, b_std)
    with torch.no_grad():
        for p, (A, B) in init.items():
            layers[p].lora_A["bench"].copy_(A)  # cast to the adapter's dtype, as PEFT's copy_ does
            layers[p].lora_B["bench"].copy_(B)


def add_peft(base, s: Setting, b_std: float = 0.0):
    """PEFT's LoRA model around a transformers `base`, same adapter and the same weights as add_ours."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(TARGETS),
                     task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    prefix = "base_model.model."
    layers = {n[len(prefix):]: m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    shapes = {p: (m.lora_B["default"].out_features, m.lora_A["default"].in_features) for p, m in layers.items()}
    with torch.no_grad():
        for p, (A, B) in lora_init(shapes, s.r, s.seed, b_std).items():
            layers[p].lora_A["default"].weight.copy_(A)
            layers[p].lora_B["default"].weight.copy_(B)
    return model


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
