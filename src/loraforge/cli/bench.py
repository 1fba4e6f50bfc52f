"""`loraforge bench`: training, generation and quantization against PEFT and bitsandbytes, one table."""

from __future__ import annotations

from pathlib import Path

from ..errors import LoraForgeError

PARTS = ("lora", "qlora", "gen", "quant")


def register(p):
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test of the harness (seconds)")
    p.add_argument("--model", metavar="SRC", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", metavar="FILE", default=None,
                   help="results JSON (default: bench/results.json, or bench/results-quick.json with --quick)")
    p.add_argument("--only", metavar="PART", action="append", choices=PARTS,
                   help="run only this part (repeatable): " + ", ".join(PARTS))
    p.add_argument("--steps", type=int, default=None, help="training steps per system (median of 3..steps)")
    p.add_argument("--threads", type=int, default=None, help="torch threads per system (default 2)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds allowed per system (twice for a pair)")
    p.add_argument("--nice", type=int, default=0,
                   help="run the workers at this nice value; negative (root only) puts them ahead of background "
                        "processes, which otherwise inflate every timing")


def run(args) -> int:
    from ..bench.runner import run as run_bench
    from ..bench.setting import Setting

    s = Setting.tiny(args.model) if args.quick else Setting(model=args.model)
    if args.steps is not None:
        if args.steps < s.timed_from:
            raise LoraForgeError(f"--steps {args.steps}: must be at least {s.timed_from} (the first timed step)")
        s.steps = args.steps
    if args.threads is not None:
        if args.threads < 1:
            raise LoraForgeError(f"--threads {args.threads}: must be at least 1")
        s.threads = args.threads
    s.nice = args.nice
    out = Path(args.out or ("bench/results-quick.json" if args.quick else "bench/results.json"))
    run_bench(s, out, args.only, args.timeout)
    return 0
