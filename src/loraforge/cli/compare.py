"""`loraforge compare DATA`: train every method on the same data and steps; DIR/report.md says what each
costs (parameters, bytes, memory, time) and buys (validation loss, exact match), measured."""

from __future__ import annotations

import argparse

from .common import add_model_args


def register(p):
    from ..compare.config import DEFAULT_LR, CompareConfig
    from ..train.config import METHODS

    d = CompareConfig(data="")
    p.add_argument("data", metavar="DATA", help="training file: .jsonl, .json, .csv or .parquet")
    p.add_argument("--methods", default=",".join(d.methods), metavar="M,M",
                   type=lambda v: [m.strip() for m in v.split(",") if m.strip()],
                   help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--full", action=argparse.BooleanOptionalAction, default=d.full,
                   help="add full fine-tuning as a reference row (trained when it fits in memory)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, metavar="N", help="optimizer steps for every row")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: runs/compare-<DATA stem>)")
    add_model_args(p, quantize=False, computes=False)

    g = p.add_argument_group("optimisation (the same for every row but the learning rate)")
    g.add_argument("--lr", default=None, metavar="LR",
                   help="one peak learning rate for every row, or METHOD=LR pairs (prefix=1e-2,full=2e-5); "
                        "defaults: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()))
    g.add_argument("--batch-size", type=int, default=d.batch_size, metavar="B", help="rows per optimizer step")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the split, the batch order and the initialisations")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA / QLoRA rank r")
    g.add_argument("--alpha", type=float, default=d.alpha, help="LoRA / QLoRA alpha")
    g.add_argument("--num-virtual-tokens", type=int, default=d.num_virtual_tokens, metavar="P",
                   help="prefix tuning: prefix length")

    g = p.add_argument_group("data and evaluation")
    g.add_argument("--format", default=None, choices=["chat", "alpaca", "completion", "text"],
                   help="record format (default: detected)")
    g.add_argument("--max-len", type=int, default=d.max_len, metavar="L", help="tokens per record")
    g.add_argument("--train-on-prompt", action=argparse.BooleanOptionalAction, default=d.train_on_prompt,
                   help="also train on prompt/user tokens")
    val = g.add_mutually_exclusive_group()
    val.add_argument("--val", metavar="FILE", default=None, help="validation file (instead of --val-split)")
    val.add_argument("--val-split", type=float, default=d.val_split, metavar="F",
                     help="fraction of DATA held out for validation")
    g.add_argument("--eval-every", type=int, default=None, metavar="N",
                   help="validate every N steps (default: 5 times per run)")
    g.add_argument("--exact-match", action=argparse.BooleanOptionalAction, default=d.exact_match,
                   help="greedy exact match on the validation records that have a reference")
    g.add_argument("--timeout", type=float, default=d.timeout, metavar="S", help="seconds allowed per row")


def run(args) -> int:
    from ..compare import CompareConfig, compare
    from ..compare.config import parse_lr
    from ..errors import LoraForgeError

    if args.dtype not in (None, "auto", "float32"):
        raise LoraForgeError(f"--dtype {args.dtype}: compare trains every row in float32, so that full "
                             "fine-tuning and the adapters are measured alike; leave --dtype out")
    cfg = CompareConfig(
        data=args.data, out=args.out, methods=args.methods, full=args.full, model=args.model, device=args.device,
        max_steps=args.max_steps, lr=parse_lr(args.lr), batch_size=args.batch_size, seed=args.seed,
        rank=args.rank, alpha=args.alpha, num_virtual_tokens=args.num_virtual_tokens, format=args.format,
        max_len=args.max_len, train_on_prompt=args.train_on_prompt, val=args.val, val_split=args.val_split,
        eval_every=args.eval_every, exact_match=args.exact_match, timeout=args.timeout,
    )
    results = compare(cfg)
    failed = [n for n, r in results["rows"].items() if "error" in r]
    return 1 if failed else 0
