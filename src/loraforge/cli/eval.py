"""`loraforge eval DATA --adapter DIR`: base model and adapter side by side on the same records.

Loss and perplexity over the tokens training would score (assistant turns, completions), and exact
match of the greedy completion of each record's prompt against its reference. A table on stdout;
`--json FILE` for scripts; `--predictions FILE.jsonl` for what each record got.
"""

from __future__ import annotations

import argparse
import logging
import math

from .common import add_model_args, load_from_args

log = logging.getLogger("loraforge")


def register(p):
    from ..train.config import DATA_FORMATS

    p.add_argument("data", metavar="DATA", help="a data file in any format `loraforge train` reads")
    p.add_argument("--adapter", metavar="DIR", required=True, help="the adapter folder to score (PEFT format)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the scores as JSON")
    p.add_argument("--predictions", metavar="FILE.jsonl", default=None,
                   help="also write one JSON object per record: prompt, reference, the adapter's prediction and "
                        "whether it matched exactly (exact), and the base model's (base_prediction, base_exact)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N records")
    p.add_argument("--max-new-tokens", type=int, default=argparse.SUPPRESS, metavar="N",
                   help="generation length for exact match (default: the longest reference + 8 tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="records per batch, for the loss and generation")
    p.add_argument("--max-len", type=int, default=1024, metavar="L", help="tokens per record for the loss")
    p.add_argument("--format", choices=DATA_FORMATS, default=argparse.SUPPRESS,
                   help="record format (default: detected)")
    p.add_argument("--train-on-prompt", action="store_true", help="score prompt tokens in the loss too")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip malformed records with a warning")
    add_model_args(p)


def run(args) -> int:
    from ..adapters import attach_adapter
    from ..data import encode_records, read_records
    from ..errors import LoraForgeError
    from ..lora import disable_adapter, set_adapter
    from ..paths import atomic_write_json
    from ..train.evaluate import score

    if args.limit is not None and args.limit < 1:
        raise LoraForgeError(f"--limit {args.limit}: must be at least 1")
    if args.batch_size < 1:
        raise LoraForgeError(f"--batch-size {args.batch_size}: must be at least 1")
    records = read_records(args.data, getattr(args, "format", None), args.skip_bad_lines)[: args.limit]
    model, tok = load_from_args(args)
    examples = encode_records(records, tok, args.max_len, args.train_on_prompt)
    name = attach_adapter(model, args.adapter)
    kw = {"batch_size": args.batch_size, "max_new_tokens": getattr(args, "max_new_tokens", None)}
    with disable_adapter(model):
        base = score(model, tok, records, examples, **kw)
    set_adapter(model, name)
    adapter = score(model, tok, records, examples, **kw)

    print(table(base, adapter, len(records)))
    if args.json:
        keys = ("loss", "perplexity", "exact_match")
        atomic_write_json(args.json, {
            "base": {k: _finite(base[k]) for k in keys},
            "adapter": {k: _finite(adapter[k]) for k in keys},
            "records": len(records),
            "exact_match_total": base["exact_match_total"],
            "data": str(args.data),
            "adapter_path": str(args.adapter),
        })
    if args.predictions:
        from ..paths import atomic_write_text

        atomic_write_text(args.predictions, predictions_jsonl(records, base["predictions"], adapter["predictions"]))
    return 0


def predictions_jsonl(records, base: list[str | None], adapter: list[str | None]) -> str:
    """One line per record; prediction and exact are null for records with no reference (plain text)."""
    import json

    from ..data import prompt_and_reference

    def exact(pred: str | None, ref: str | None) -> bool | None:
        return None if pred is None or ref is None else pred.strip() == ref.strip()

    lines = []
    for rec, b, a in zip(records, base, adapter, strict=True):
        prompt, ref = prompt_and_reference(rec)
        lines.append(json.dumps({"where": rec.where, "prompt": prompt, "reference": ref, "prediction": a,
                                 "exact": exact(a, ref), "base_prediction": b, "base_exact": exact(b, ref)},
                                ensure_ascii=False) + "\n")
    return "".join(lines)


def _finite(v):
    return v if not (isinstance(v, float) and not math.isfinite(v)) else None  # JSON has no NaN or inf


def table(base: dict, adapter: dict, n_records: int) -> str:
    def em(s: dict) -> str:
        if s["exact_match"] is None:
            return "n/a"
        return f"{100 * s['exact_match']:.1f}% ({s['exact_match_count']}/{s['exact_match_total']})"

    rows = [("", "base", "adapter"),
            ("loss", f"{base['loss']:.4f}", f"{adapter['loss']:.4f}"),
            ("perplexity", f"{base['perplexity']:.2f}", f"{adapter['perplexity']:.2f}"),
            ("exact match", em(base), em(adapter))]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:>{w[1]}}  {c:>{w[2]}}" for a, b, c in rows]
    return "\n".join(lines) + f"\n({n_records} records)"
