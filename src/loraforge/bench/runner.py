"""Run every measured system in its own process, in a fixed order, then print the table and write JSON."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from ..paths import atomic_write_json
from ..procstat import loadavg
from .report import build, table
from .setting import Setting

log = logging.getLogger("loraforge")

# (result key, worker, setting overrides). Each anchor runs right after the system it anchors, so a
# change in background load between the two is as small as it can be.
PLAN = [
    ("matmul_rate", "matmul_rate", {}),
    ("lora_ours", "lora_ours", {}),
    ("lora_peft", "lora_peft", {}),
    ("lora_ours_auto", "lora_ours", {"dtype": "auto"}),
    ("lora_peft_bf16", "lora_peft", {"autocast": True}),
    ("qlora_ours", "qlora_ours", {}),
    ("qlora_peft_bnb", "qlora_peft_bnb", {}),
    ("qlora_ours_auto", "qlora_ours", {"dtype": "auto"}),
    ("qlora_peft_bnb_bf16", "qlora_peft_bnb", {"autocast": True}),
    ("lora_ours_ckpt", "lora_ours", {"grad_checkpointing": True}),
    ("gen_ours", "gen_ours", {}),
    ("gen_ours_merged", "gen_ours_merged", {}),
    ("gen_peft", "gen_peft", {}),
    ("quant_ours", "quant_ours", {}),
    ("quant_bnb", "quant_bnb", {}),
]
# run in lockstep (see run_pair)
PAIRS = {"lora_ours": "lora_peft", "qlora_ours": "qlora_peft_bnb", "lora_ours_auto": "lora_peft_bf16",
         "qlora_ours_auto": "qlora_peft_bnb_bf16"}
QUICK_SKIPS = ("lora_ours_ckpt",)  # the smoke test only needs each worker kind once
BF16_ONLY = ("lora_peft_bf16", "qlora_peft_bnb_bf16")  # ~100x slower where bf16 is not fast: not run there
GROUPS = {"lora": ("lora_ours", "lora_peft", "lora_ours_ckpt", "lora_ours_auto", "lora_peft_bf16"),
          "qlora": ("qlora_ours", "qlora_peft_bnb", "qlora_ours_auto", "qlora_peft_bnb_bf16"),
          "gen": ("gen_ours", "gen_ours_merged", "gen_peft"), "quant": ("quant_ours", "quant_bnb")}


def _env(s: Setting) -> dict:
    return dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
                OMP_NUM_THREADS=str(s.threads), MKL_NUM_THREADS=str(s.threads))


def _cmd(worker: str, s: Setting) -> list[str]:
    cmd = [sys.executable, "-m", "loraforge.bench.worker", worker, json.dumps(s.to_json())]
    return ["nice", "-n", str(s.nice), *cmd] if s.nice and shutil.which("nice") else cmd


def _parse(stdout: str, stderr: str, code: int | None) -> dict:
    lines = [ln for ln in stdout.strip().splitlines() if ln.startswith("{")]
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        errs = [ln for ln in stderr.splitlines() if "Error" in ln or "error:" in ln]
        return {"error": (errs[-1] if errs else f"exit status {code}, no result").strip()[:300]}


def run_worker(worker: str, s: Setting, timeout: float) -> dict:
    try:
        p = subprocess.run(_cmd(worker, s), capture_output=True, text=True, env=_env(s), timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    return _parse(p.stdout, p.stderr, p.returncode)


def run_pair(a: str, b: str, sa: Setting, sb: Setting, timeout: float) -> tuple[dict, dict]:
    """Two training workers in lockstep: step i of one, then step i of the other (alternating who goes
    first), so a burst of background load falls on both rather than on whichever ran at that time.
    Each still runs in its own process, so its peak RSS is its own."""
    settings = {a: dataclasses.replace(sa, lockstep=True), b: dataclasses.replace(sb, lockstep=True)}
    s = settings[a]
    procs, errs = {}, {}
    for w in (a, b):
        errs[w] = tempfile.TemporaryFile(mode="w+")
        procs[w] = subprocess.Popen(_cmd(w, settings[w]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=errs[w], text=True, env=_env(settings[w]))
    timer = threading.Timer(timeout, lambda: [p.kill() for p in procs.values()])
    timer.start()
    out = {w: [] for w in procs}
    try:
        for i in range(s.steps):
            for w in ((a, b) if i % 2 == 0 else (b, a)):
                p = procs[w]
                if p.poll() is not None:
                    continue
                try:
                    p.stdin.write("go\n")
                    p.stdin.flush()
                except BrokenPipeError:
                    continue
                for line in p.stdout:  # until this step is done (or the worker ends)
                    out[w].append(line)
                    if line.startswith("step-done"):
                        break
        results = []
        for w, p in procs.items():
            try:
                p.stdin.close()
            except BrokenPipeError:  # it has ended already
                pass
            rest = p.stdout.read()  # not communicate(): it would skip what the line iterator buffered
            p.wait()
            errs[w].seek(0)
            res = _parse("".join(out[w]) + rest, errs[w].read(), p.returncode)
            if timer.finished.is_set() and "error" in res:
                res = {"error": f"timed out after {timeout:.0f} s"}
            results.append(res)
    finally:
        timer.cancel()
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    return results[0], results[1]


def machine() -> dict:
    import torch

    from ..model.precision import cpu_model

    info = {"cpu": cpu_model(), "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_start": loadavg()}
    for pkg in ("transformers", "peft", "bitsandbytes"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - a missing package only blanks its version
            info[pkg] = None
    return info


def run(s: Setting, out: Path, only: list[str] | None = None, timeout: float = 900.0) -> dict:
    keys = None
    if only:
        keys = {"matmul_rate"}
        for o in only:
            keys.update(GROUPS.get(o, (o,)))
    from ..model.precision import cpu_bf16_verdict

    m, raw, t_all = machine(), {}, time.perf_counter()
    m["bf16"] = verdict = cpu_bf16_verdict()
    plan = {key: (worker, over) for key, worker, over in PLAN}
    for key, worker, over in PLAN:
        if (keys is not None and key not in keys) or (s.quick and key in QUICK_SKIPS) or key in raw:
            continue
        if key in BF16_ONLY and not verdict["fast"]:
            raw[key] = {"skipped": f"bf16 is not fast on this CPU ({verdict['capability']})"}
            continue
        t0 = time.perf_counter()
        anchor = PAIRS.get(key)
        if anchor and (keys is None or anchor in keys) and not (anchor in BF16_ONLY and not verdict["fast"]):
            b_worker, b_over = plan[anchor]
            raw[key], raw[anchor] = run_pair(worker, b_worker, dataclasses.replace(s, **over),
                                             dataclasses.replace(s, **b_over), 2 * timeout)
            done = (key, anchor)
        else:
            raw[key] = run_worker(worker, dataclasses.replace(s, **over), timeout)
            done = (key,)
        for k in done:
            status = raw[k].get("error") or raw[k].get("pending") or "ok"
            log.info("bench: %-16s %6.0f s  %s", k, time.perf_counter() - t0, status)
    m["loadavg_end"], m["total_s"] = loadavg(), time.perf_counter() - t_all
    res = build(raw, s, m)
    atomic_write_json(out, res)
    print(table(res))
    print(f"results written to {out}")
    return res
