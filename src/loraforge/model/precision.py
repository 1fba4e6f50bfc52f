"""Which dtype a model computes in: `--dtype auto` asks the hardware.

On CUDA bf16 is the fast path (fp16 on GPUs without bf16). On CPU it depends on the chip: with AMX
(Intel Sapphire Rapids and later) bf16 matrix products ran 1.4-5x faster than fp32 on this project's
machines, depending on the shape (2 cores, oneDNN: [1024, 576] x [576, 1536] 3.4x, 768^3 only 1.4x), and
a LoRA training step 1.6x faster; on AMD EPYC cores without it bf16 ran ~100x slower. So the CPU's
capabilities pick a candidate and a timed product on training-like shapes confirms it: with AMX, bf16
unless it is outright slower than fp32 (an emulated or broken path); with AVX-512 alone, only when it is
FAST_RATIO times faster. The verdict is cached per CPU model and torch version in $LORAFORGE_HOME, since
timing costs ~0.5 s.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass

import torch

from ..errors import LoraForgeError
from ..paths import atomic_write_json, home

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
FAST_RATIO = 1.5  # without AMX, bf16 counts as fast when its products run at least this much faster than fp32's


@dataclass(frozen=True)
class Precision:
    device: torch.device
    dtype: torch.dtype
    why: str  # one phrase for the load line


def resolve_precision(device: str | None, dtype: str | torch.dtype | None) -> Precision:
    """The device and compute dtype for `--device` / `--dtype`.

    dtype None keeps the library's deterministic default (fp32 on CPU, bf16 on CUDA): the Python API and
    the tests give the same numbers on every CPU. The command line passes "auto".
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isinstance(dtype, torch.dtype):
        return Precision(dev, dtype, "as asked")
    if dtype is None:
        return Precision(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, "default")
    if dtype == "auto":
        return _auto(dev)
    if dtype not in DTYPES:
        raise LoraForgeError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPE_CHOICES)}")
    return Precision(dev, DTYPES[dtype], "as asked")


def _auto(dev: torch.device) -> Precision:
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision(dev, torch.bfloat16, "auto: CUDA with bf16")
        return Precision(dev, torch.float16, "auto: CUDA without bf16")
    if dev.type != "cpu":
        return Precision(dev, torch.float32, f"auto: {dev.type}")
    verdict = cpu_bf16_verdict()
    if verdict["fast"]:
        return Precision(dev, torch.bfloat16, f"auto: this CPU multiplies bf16 {verdict['ratio']:.1f}x faster "
                                              f"than fp32 ({verdict['capability']})")
    if verdict["ratio"] is None:
        return Precision(dev, torch.float32, f"auto: no fast bf16 on this CPU ({verdict['capability']})")
    return Precision(dev, torch.float32, f"auto: bf16 runs {verdict['ratio']:.2f}x fp32's speed here "
                                         f"({verdict['capability']}), so fp32")


def cpu_capability() -> str:
    caps = []
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    if amx is not None and amx():
        caps.append("AMX")
    try:
        caps.append(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        pass
    return ", ".join(caps) or "unknown"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_bf16_verdict(cache: bool = True) -> dict:
    """{"fast": bool, "ratio": bf16 speed / fp32 speed or None, "capability": str}, cached on disk."""
    cap = cpu_capability()
    key = f"{cpu_model()} | {cap} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    path = home() / "cpu_bf16.json"
    known: dict = {}
    if cache:
        try:
            read = json.loads(path.read_text())
            known = read if isinstance(read, dict) else {}
        except (OSError, ValueError):
            pass
        if isinstance(known.get(key), dict):
            return known[key]
    # Only chips with bf16 matrix instructions are worth timing; the rest are slow by construction.
    if "AMX" not in cap and "AVX512" not in cap.upper():
        verdict = {"fast": False, "ratio": None, "capability": cap}
    else:
        ratio = fp32_time_over_bf16_time()
        verdict = {"fast": ratio >= (1.0 if "AMX" in cap else FAST_RATIO), "ratio": round(ratio, 2), "capability": cap}
    if cache:
        try:
            atomic_write_json(path, {**known, key: verdict})
        except OSError:
            pass  # a read-only home just means timing again next time
    return verdict


# A decoder projection's forward and input-gradient shapes at 1024 tokens (SmolLM2's MLP): oneDNN's bf16
# speed-up depends on the shape, so the check times the kind of product training runs.
SHAPES = ((1024, 576, 1536), (1024, 1536, 576))


def fp32_time_over_bf16_time(reps: int = 5) -> float:
    """How many times faster SHAPES' products run in bf16 than in fp32 (their summed best times).

    The two dtypes take turns and each keeps its best time per shape, so a burst of load from elsewhere on
    the machine hits both alike rather than skewing the ratio."""
    g = torch.Generator().manual_seed(0)
    total = dict.fromkeys((torch.float32, torch.bfloat16), 0.0)
    for m, k, n in SHAPES:
        a, b = torch.randn(m, k, generator=g), torch.randn(k, n, generator=g)
        pairs = {dt: (a.to(dt), b.to(dt)) for dt in total}
        best = dict.fromkeys(pairs, float("inf"))
        for i in range(reps + 1):  # the first round warms up (kernel choice, allocation) and is dropped
            for dt, (x, y) in pairs.items():
                t0 = time.perf_counter()
                x @ y
                if i:
                    best[dt] = min(best[dt], time.perf_counter() - t0)
        for dt in total:
            total[dt] += best[dt]
    return total[torch.float32] / max(total[torch.bfloat16], 1e-9)
