"""One row of a comparison per process: `python -m loraforge.compare.worker ROW CONFIG_JSON`.

A fresh process per row means its peak RSS (VmHWM) is its own: one method's model, optimizer state and
allocator cache cannot raise another's. The result is printed as one JSON line, last on stdout; logs go
to stderr (the parent sends them to DIR/logs/ROW.log).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

import torch

from ..errors import LoraForgeError
from ..procstat import rss_bytes
from .config import BASE, FULL, CompareConfig
from .measure import adapter_bytes, held_weight_bytes, read_split, step_stats, trainable_count


def _scores(cfg: CompareConfig, model, tok, val_records) -> dict[str, Any]:
    """Exact match of greedy completions on the validation records that have a reference."""
    if not (cfg.exact_match and val_records):
        return {"exact_match": None, "em_correct": None, "em_total": 0}
    from ..train.evaluate import exact_match

    em = exact_match(model, tok, val_records, batch_size=cfg.batch_size)
    return {"exact_match": em.fraction, "em_correct": em.correct, "em_total": em.total}


def _gpu_peak(device: torch.device) -> dict[str, int]:
    return {"peak_gpu": torch.cuda.max_memory_allocated(device)} if device.type == "cuda" else {}


def _trained(cfg: CompareConfig, row: str, model, tok, out, train_s: float) -> dict[str, Any]:
    """The columns every trained row shares, measured on the model it has just trained."""
    from ..model.loading import count_parameters
    from ..train.metrics import read_metrics

    peak = rss_bytes()["peak"]  # before exact match: its generation is not part of training
    records = read_metrics(out / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if r.get("val_loss") is not None]
    from ..lora.model import trainable_counts

    trainable = trainable_count(model)
    res = {"trainable": trainable, "model_params": count_parameters(model) - (0 if row == FULL else trainable),
           "trainable_percent": 100 * trainable / max(1, trainable_counts(model)[1]),  # as `train` reports it
           "base_bytes": held_weight_bytes(model, frozen_only=row != FULL), "peak_rss": peak,
           "steps": sum(1 for r in records if "loss" in r), "val_loss": vals[-1] if vals else None,
           "train_loss": next((r["loss"] for r in reversed(records) if "loss" in r), None), "train_s": train_s,
           **step_stats(records), **_gpu_peak(model.inv_freq.device)}
    if row == FULL:
        # Not written (see full.py): the bytes a safetensors file of the trained weights would hold.
        res["adapter_bytes"], res["adapter_written"] = held_weight_bytes(model, frozen_only=False), False
    else:
        res["adapter_bytes"], res["adapter_written"] = adapter_bytes(out), True
    return res


def run_adapter(cfg: CompareConfig, method: str) -> dict[str, Any]:
    from ..train import train

    t0 = time.perf_counter()
    result = train(cfg.train_config(method), progress=False)
    res = _trained(cfg, method, result.model, result.tokenizer, result.out, time.perf_counter() - t0)
    return {**res, **_scores(cfg, result.model, result.tokenizer, read_split(cfg)[1])}


def run_full(cfg: CompareConfig) -> dict[str, Any]:
    from .full import train_full

    out = cfg.out_dir() / FULL
    t0 = time.perf_counter()
    model, tok = train_full(cfg, out)
    res = _trained(cfg, FULL, model, tok, out, time.perf_counter() - t0)
    return {**res, **_scores(cfg, model, tok, read_split(cfg)[1])}


def run_base(cfg: CompareConfig) -> dict[str, Any]:
    """The untrained model on the validation records, and what the full fine-tuning estimate needs."""
    from ..data import encode_records
    from ..model import load_model
    from ..model.loading import count_parameters
    from ..train.evaluate import mean_loss

    train_records, val_records = read_split(cfg)
    model, tok = load_model(cfg.model, device=cfg.device, dtype="float32")
    lengths = [len(e.input_ids) for e in encode_records(train_records, tok, cfg.max_len, cfg.train_on_prompt)]
    val = encode_records(val_records, tok, cfg.max_len, cfg.train_on_prompt) if val_records else []
    c = model.config
    res = {"trainable": 0, "model_params": count_parameters(model), "base_bytes": held_weight_bytes(model),
           "val_loss": mean_loss(model, val, tok.pad_token_id, cfg.batch_size) if val else None,
           "dims": {k: getattr(c, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                               "num_attention_heads", "num_key_value_heads", "head_dim")},
           "longest_row": max(lengths, default=0), "train_records": len(train_records),
           "val_records": len(val_records)}
    return {**res, **_scores(cfg, model, tok, val_records)}


def main(argv: list[str]) -> int:
    from ..cli import setup_logging

    setup_logging()
    row, cfg = argv[0], CompareConfig.from_json(json.loads(argv[1]))
    t0 = time.perf_counter()
    try:
        if row == BASE:
            result = run_base(cfg)
        elif row == FULL:
            result = run_full(cfg)
        else:
            result = run_adapter(cfg, row)
    except LoraForgeError as e:
        result = {"error": str(e)}
    except Exception as e:  # noqa: BLE001 - a failing row is reported in the table, the others still run
        traceback.print_exc(file=sys.stderr)
        result = {"error": f"{type(e).__name__}: {e}"}
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
