"""`make demo`: train persona and task adapters on the embedded model, then show them off.

1. Trains three adapters with QLoRA (NF4 base + LoRA) on the example data: a pirate, a butler, and a
   date-to-ISO converter. A finished adapter is kept and reused by the next run (delete runs/demo to
   retrain); an interrupted one resumes from its last checkpoint.
2. Answers the same prompts with the base model and every adapter, side by side, in one mixed batch
   (one adapter per row).
3. Scores the date task's held-out exact match, base vs adapter.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path

log = logging.getLogger("loraforge")

# Sized so that all three fit in about 10 minutes on 2 CPU cores (see README: make demo).
ADAPTERS = {
    # name: (training file, optimizer steps)
    "pirate": ("pirate.jsonl", 25),
    "butler": ("butler.jsonl", 25),
    "dates": ("dates.jsonl", 30),
}


def train_adapters(examples: Path, runs: Path, method: str, steps_scale: float) -> dict[str, Path]:
    from .train import TrainConfig, train

    out = {}
    for name, (file, steps) in ADAPTERS.items():
        dest = runs / name
        cfg = TrainConfig(data=str(examples / file), out=str(dest), method=method, rank=8, alpha=16, dropout=0.0,
                          max_steps=max(2, int(steps * steps_scale)), lr=2e-3, batch_size=4, max_len=96,
                          val_split=0.05, eval_every=0, save_every=10, keep_checkpoints=1, seed=0)
        if _finished(dest, cfg):
            log.info("%s: already trained in %s (delete it to retrain)", name, dest)
        else:
            t0 = time.perf_counter()
            log.info("%s: training %d %s steps on %s", name, cfg.max_steps, method, file)
            train(cfg, resume=True, progress=True)
            log.info("%s: done in %.0fs", name, time.perf_counter() - t0)
        out[name] = dest
    return out


def _finished(dest: Path, cfg) -> bool:
    """A complete adapter from the same settings (metrics show the last step) can be reused."""
    import yaml

    if not (dest / "adapter_model.safetensors").exists() or not (dest / "config.yaml").exists():
        return False
    saved = yaml.safe_load((dest / "config.yaml").read_text()) or {}
    same = all(saved.get(k) == getattr(cfg, k) for k in ("method", "rank", "max_steps", "lr", "data"))
    lines = (dest / "metrics.jsonl").read_text().splitlines() if (dest / "metrics.jsonl").exists() else []
    steps = [json.loads(x).get("step", 0) for x in lines if x.strip()]
    return same and bool(steps) and max(steps) >= cfg.max_steps


def show_side_by_side(model, tok, names: list[str], prompts: list[str], max_new_tokens: int) -> None:
    from .generate import SamplingParams, generate
    from .lora import adapter_ids_for

    rows = [(p, n) for p in prompts for n in [None, *names]]
    ids = adapter_ids_for(model, [n for _, n in rows])
    outs = generate(model, tok, [p for p, _ in rows], SamplingParams(max_new_tokens=max_new_tokens), adapter_ids=ids)
    width = shutil.get_terminal_size((100, 20)).columns
    for i, p in enumerate(prompts):
        print(f"\n=== {p}")
        for j, n in enumerate([None, *names]):
            text = " ".join(outs[i * (len(names) + 1) + j].split()) or "(empty)"
            label = f"{n or 'base':>7} | "
            print(textwrap.fill(text, width=max(60, width - 2), initial_indent=label,
                                subsequent_indent=" " * len(label)))


def task_exact_match(model, tok, test_file: Path) -> tuple[float, float]:
    from .data import read_records
    from .lora import disable_adapter, set_adapter
    from .train.evaluate import exact_match

    records = read_records(test_file)
    with disable_adapter(model):
        base = exact_match(model, tok, records, batch_size=16)
    set_adapter(model, "dates")
    tuned = exact_match(model, tok, records, batch_size=16)
    for r, b, t in list(zip(records, base.predictions, tuned.predictions, strict=True))[:3]:
        print(f"  {r.chat()[-2]['content']!r}: base {b!r} -> adapter {t!r} (want {r.chat()[-1]['content']!r})")
    return base.fraction, tuned.fraction


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loraforge.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", default="examples", help="folder with the example datasets")
    p.add_argument("--runs", default="runs/demo", help="where the adapters are written")
    p.add_argument("--method", default=None, choices=["lora", "qlora"], help="default: qlora")
    p.add_argument("--steps-scale", type=float, default=1.0, help="multiply every adapter's step count")
    p.add_argument("--max-new-tokens", type=int, default=48)
    args = p.parse_args(argv)

    from .cli import setup_logging
    from .errors import LoraForgeError

    setup_logging()
    try:
        return _run(args)
    except LoraForgeError as e:
        print(f"loraforge: error: {e}", file=sys.stderr)
        return 2


def _run(args) -> int:
    import torch

    from .adapters import attach_adapter
    from .model import load_model

    torch.manual_seed(0)
    examples, runs = Path(args.examples), Path(args.runs)
    method = args.method or "qlora"
    t0 = time.perf_counter()
    print(f"==> [demo] 1/3 training {', '.join(ADAPTERS)} with {method} on SmolLM2-135M-Instruct "
          f"(CPU, {torch.get_num_threads()} threads)", flush=True)
    paths = train_adapters(examples, runs, method, args.steps_scale)
    print(f"==> [demo] training finished in {time.perf_counter() - t0:.0f}s; adapters in {runs}/", flush=True)

    model, tok = load_model(None, quantize="nf4" if method == "qlora" else None)
    for name, path in paths.items():
        attach_adapter(model, path, name, activate=False)
    prompts = [x.strip() for x in (examples / "prompts.txt").read_text().splitlines() if x.strip()]
    print("\n==> [demo] 2/3 the same prompts, base model vs each adapter (one mixed batch)", flush=True)
    show_side_by_side(model, tok, ["pirate", "butler"], prompts[:4], args.max_new_tokens)

    print("\n==> [demo] 3/3 held-out exact match on examples/dates_test.jsonl (date -> ISO 8601)", flush=True)
    base, tuned = task_exact_match(model, tok, examples / "dates_test.jsonl")
    print(f"\n  exact match: base {base:.0%}  ->  dates adapter {tuned:.0%}")
    print(f"\n==> [demo] done in {time.perf_counter() - t0:.0f}s. Try: loraforge chat --adapter pirate={paths['pirate']} "
          f"--adapter butler={paths['butler']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
