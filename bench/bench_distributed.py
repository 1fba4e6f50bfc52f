"""Training on 1 and 2 processes (gloo on CPU): tokens/s and resident memory per process, in one run.

    .venv/bin/python bench/bench_distributed.py [--model SRC] [--method qlora] [--steps 6] [--batch 4]

Each row is `loraforge train --nproc N` as a user runs it, with the same global batch (--batch rows split
over the processes) and the same data, so the rows train the same adapter. tokens/s is the median over the
steps after the first (metrics.jsonl's tokens_per_s counts the tokens of all ranks); memory is each rank's
resident set at the end and at its peak (loading the whole model before sharding it sets the peak).
Threads: the first row gives one process every core, the others a share (OMP_NUM_THREADS); on a 2-core
machine expect no speed-up: the rows show that the ranks agree (dropout 0: the same final loss) and what
FSDP saves.
Prints a table; writes bench/distributed_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def chat_data(path: Path, n: int = 64) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": f"Describe item number {i} in one sentence."},
                    {"role": "assistant", "content": f"Item {i} is a small {['red', 'green', 'blue'][i % 3]} box "
                                                     f"that weighs {i * 3 % 17 + 1} grams and costs {i % 9 + 2} euros."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def run(nproc: int, strategy: str, threads: int, args, data: Path, work: Path) -> dict:
    out = work / f"n{nproc}-{strategy}-t{threads}"
    cmd = [sys.executable, "-m", "loraforge", "train", str(data), "--out", str(out), "--method", args.method,
           "--max-steps", str(args.steps), "--batch-size", str(args.batch // nproc), "--eval-every", "0",
           "--save-every", "0", "--max-len", "128", "--dropout", "0", "--dtype", "float32", "--device", "cpu", "--no-progress",
           "--nproc", str(nproc), "--strategy", strategy]
    if args.model:
        cmd += ["--model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r]
    mem = steps[-1]
    return {"processes": nproc, "strategy": strategy if nproc > 1 else "-", "threads": threads, "tokens_per_s":
            statistics.median(r["tokens_per_s"] for r in steps[1:]), "final_loss": steps[-1]["loss"],
            "rss_mb": mem["rss_mb"], "peak_rss_mb": mem["peak_rss_mb"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    ap.add_argument("--method", default="qlora", choices=("lora", "qlora", "prefix"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="global batch (rows per step, all processes)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = chat_data(work / "data.jsonl")
        cores = os.cpu_count() or 1
        # the same cores in all (1 process x all threads, or a share each), and 1 process on one core
        rows = [run(1, "ddp", cores, args, data, work), run(1, "ddp", max(1, cores // 2), args, data, work),
                run(2, "ddp", max(1, cores // 2), args, data, work), run(2, "fsdp", max(1, cores // 2), args, data, work)]
    base = rows[0]["tokens_per_s"]
    print(f"{args.method}, {args.model or 'embedded SmolLM2-135M'}, global batch {args.batch}, {args.steps} steps, "
          f"{os.cpu_count()} cores")
    print(f"{'processes':>9} {'strategy':>8} {'threads':>7} {'tokens/s':>9} {'vs 1':>6} {'final loss':>10} {'RSS MB per rank':>16} "
          f"{'peak MB':>12}")
    for r in rows:
        r["ratio_vs_1"] = round(r["tokens_per_s"] / base, 3)
        print(f"{r['processes']:>9} {r['strategy']:>8} {r['threads']:>7} {r['tokens_per_s']:>9.1f} {r['ratio_vs_1']:>6.2f} "
              f"{r['final_loss']:>10.4f} {'/'.join(map(str, r['rss_mb'])):>16} {'/'.join(map(str, r['peak_rss_mb'])):>12}")
    dest = ROOT / "bench" / "distributed_results.json"
    dest.write_text(json.dumps({"method": args.method, "model": args.model or "embedded", "batch": args.batch,
                                "steps": args.steps, "cpu_count": os.cpu_count(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
