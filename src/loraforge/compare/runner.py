"""Run each row of a comparison in its own worker process, then write report.md, compare.png and
compare.json into DIR and print the table.

    from loraforge.compare import CompareConfig, compare
    results = compare(CompareConfig(data="examples/dates.jsonl", val="examples/dates_test.jsonl"))
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import LoraForgeError
from ..paths import atomic_write_json, atomic_write_text
from ..procstat import loadavg
from .config import BASE, FULL, LABELS, CompareConfig
from .full import ADAMW_BYTES_PER_PARAM, activation_bytes, available_memory, plan, skip_reason

log = logging.getLogger("loraforge")


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Train and measure every row; returns what compare.json holds."""
    from .measure import read_split
    from .report import plot, render, table

    out = cfg.out_dir()
    _check_out(out, cfg)
    train_records, val_records = read_split(cfg)  # bad data fails here, in one line, before any worker starts
    load_start, t_all = loadavg(), time.perf_counter()
    rows: dict[str, dict[str, Any]] = {}
    names = cfg.rows()
    for i, name in enumerate(names, 1):
        lr = cfg.lr_for(name)
        what = "scoring the untrained model" if name == BASE else \
            f"training {cfg.max_steps} steps at lr {lr:g}"
        if name == FULL:
            try:
                p = _full_plan(cfg, rows)
            except LoraForgeError as e:
                rows[name] = {"error": str(e)}
                log.info("compare: [%d/%d] %s: %s", i, len(names), LABELS[name], e)
                continue
            if not p["fits"]:
                rows[name] = {"skipped": skip_reason(p), "plan": p}
                log.info("compare: [%d/%d] %s %s", i, len(names), LABELS[name], rows[name]["skipped"])
                continue
            what += f" (needs ~{p['need'] / 1e9:.1f} GB of {p['available'] / 1e9:.1f} GB available)"
        log.info("compare: [%d/%d] %s: %s ...", i, len(names), LABELS[name], what)
        res = run_worker(name, cfg, out / "logs" / f"{name}.log")
        if name == FULL:
            res["plan"] = p
        rows[name] = res
        log.info("compare: [%d/%d] %s: %s", i, len(names), LABELS[name], _summary(res))
    results = {
        "settings": {**cfg.to_json(), "out": str(out), "eval_every": cfg.evals_every(),
                     "lr": {n: cfg.lr_for(n) for n in names if n != BASE},
                     "train_records": len(train_records), "val_records": len(val_records)},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_start": load_start, "loadavg_end": loadavg()},
        "wall_s": time.perf_counter() - t_all,
        "rows": {n: {**r, "curve": _curve(out / n)} for n, r in rows.items()},
    }
    atomic_write_json(out / "compare.json", results)
    plot(results, out / "compare.png")
    atomic_write_text(out / "report.md", render(results))
    print(table(results))
    sys.stdout.flush()
    return results


def run_worker(name: str, cfg: CompareConfig, log_path: Path) -> dict[str, Any]:
    """Run one row in `python -m loraforge.compare.worker`; its stderr goes to `log_path`."""
    import loraforge

    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error")
    # The child imports this very loraforge, installed or not.
    src = str(Path(loraforge.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "loraforge.compare.worker", name, json.dumps(cfg.to_json())]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w", encoding="utf-8") as err:
        try:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env, timeout=cfg.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {cfg.timeout:.0f} s (--timeout); log: {log_path}"}
    lines = p.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, ValueError):
        tail = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:]
        return {"error": f"worker exited with status {p.returncode}: {tail[0][:300] if tail else 'no output'}; "
                         f"log: {log_path}"}


def _full_plan(cfg: CompareConfig, rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Will full fine-tuning fit? Activations come from the LoRA run when there is one (its peak less
    its weights and adapter state: activations plus the runtime's own footprint, so an overestimate),
    else from a per-layer formula on the base row's dimensions."""
    base = rows.get(BASE, {})
    if "model_params" not in base:
        raise LoraForgeError(f"full fine-tuning: the base row failed ({base.get('error')}), so its size is "
                             "unknown; pass --no-full or fix that first")
    lora = rows.get("lora", {})
    if "peak_rss" in lora:
        adapter_state = ADAMW_BYTES_PER_PARAM * lora["trainable"]
        acts, source = max(0, lora["peak_rss"] - lora["base_bytes"] - adapter_state), "lora run"
    else:
        seq = min(base["longest_row"], cfg.max_len)
        acts, source = activation_bytes(base["dims"], cfg.batch_size, seq), "formula"
    return {**plan(base["model_params"], acts, available_memory()), "activations_from": source}


def _check_out(out: Path, cfg: CompareConfig) -> None:
    used = [out / n for n in (*cfg.rows(), "report.md") if (out / n).exists()]
    if used:
        raise LoraForgeError(f"{used[0]}: already exists; choose another --out (a comparison never mixes "
                             "into an old one)")


def _curve(folder: Path) -> dict[str, list]:
    from ..train.metrics import read_metrics

    path = folder / "metrics.jsonl"
    records = read_metrics(path) if path.exists() else []
    return {"train": [[r["step"], r["loss"]] for r in records if r.get("loss") is not None],
            "val": [[r["step"], r["val_loss"]] for r in records if r.get("val_loss") is not None]}


def _summary(res: dict[str, Any]) -> str:
    if "error" in res:
        return f"failed: {res['error']}"
    bits = [f"done in {res['wall_s']:.0f} s"]
    if res.get("val_loss") is not None:
        bits.append(f"val loss {res['val_loss']:.4f}")
    if res.get("step_s") is not None:
        bits.append(f"{res['step_s']:.2f} s/step")
    if res.get("peak_rss"):
        bits.append(f"peak RSS {res['peak_rss'] / 1e6:.0f} MB")
    if res.get("exact_match") is not None:
        bits.append(f"exact match {res['em_correct']}/{res['em_total']}")
    return ", ".join(bits)
