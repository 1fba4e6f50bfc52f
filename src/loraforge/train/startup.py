"""What a training run checks and reads before its first step: the output folder (fresh, or the checkpoint
to resume and whether this run may resume it), the data, split and encoded."""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraForgeError
from ..paths import remove_stale_temp
from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig

log = logging.getLogger("loraforge")

# Changing these between a checkpoint and its resume would make the checkpoint meaningless.
RESUME_FIXED = ("data", "model", "method", "rank", "alpha", "targets", "num_virtual_tokens", "prefix_projection",
                "seed", "format", "max_len", "train_on_prompt", "pack", "val", "val_split", "grad_accum")


def check_out_dir(out: Path, resume: bool, dist: distributed.Dist) -> Path | None:
    """The checkpoint to resume from (None: start fresh). A fresh run refuses to mix into an old one.
    Every rank checks; rank 0 alone tidies up, and nobody looks before it is done."""
    if resume:
        if dist.main:
            ckpt.remove_stale(out)
            # what a killed run's atomic writes left half-done: best/ and the adapter's staging folder
            for name in ("best", ".adapter.tmp", "config.yaml", "loss.png", "metrics.jsonl"):
                remove_stale_temp(out / name)
            if (out / ".adapter.tmp").is_dir():
                shutil.rmtree(out / ".adapter.tmp", ignore_errors=True)
        dist.barrier()
        last = ckpt.latest_intact_checkpoint(out)
        if last is None:
            log.warning("%s: no checkpoint to resume from; starting from scratch", out)
        return last
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LoraForgeError(f"{out}: already exists and is not empty; pass --resume to continue that run, "
                             "or choose another --out")
    dist.barrier()  # before rank 0 creates it
    return None


def check_resumable(path: Path, cfg: TrainConfig, dist: distributed.Dist) -> None:
    def same(key: str, a, b) -> bool:
        if key in ("data", "val", "model") and a and b:  # the same file, however it was spelled
            return Path(a).resolve() == Path(b).resolve()
        return a == b

    state = ckpt.read_state(path)
    old = state.get("config", {})
    changed = [k for k in RESUME_FIXED if k in old and not same(k, old[k], getattr(cfg, k))]
    # the data order is cut into global micro-batches: the process count may change, their size may not
    n_old = state.get("processes", 1)
    if "batch_size" in old and old["batch_size"] * n_old != cfg.batch_size * dist.world:
        need = old["batch_size"] * n_old / dist.world
        fix = (f"pass --batch-size {int(need)}" if need.is_integer() else
               f"use a process count that divides {old['batch_size'] * n_old}")
        raise LoraForgeError(f"--resume: {path} was trained with global micro-batches of {old['batch_size'] * n_old} "
                             f"rows (batch {old['batch_size']} x {n_old} process{'es' * (n_old > 1)}), this run has "
                             f"{cfg.batch_size * dist.world} ({cfg.batch_size} x {dist.world}); {fix} to keep them")
    if changed:
        k = changed[0]
        raise LoraForgeError(f"--resume: {k} was {old[k]!r} in {path}, this run has {getattr(cfg, k)!r}; "
                             "resume with the same settings (or train into a new --out)")


def read_data(cfg: TrainConfig):
    """(train records, validation records): the --val file, or a seeded --val-split of the data."""
    from ..data import read_records, split_records

    opts = {"txt_lines": cfg.txt_lines, "max_line_bytes": cfg.max_line_bytes}
    records = read_records(cfg.data, cfg.format, cfg.skip_bad_lines, **opts)
    if cfg.val:
        val = read_records(cfg.val, cfg.format, cfg.skip_bad_lines, **opts)
        return records, val
    if cfg.val_split > 0 and len(records) < 2:
        log.warning("%s: a single record; training without validation", cfg.data)
        return records, []
    return split_records(records, cfg.val_split, seed=cfg.seed)


def encode(cfg: TrainConfig, tok, train_records, val_records):
    from ..data import encode_records, pack_examples

    examples = encode_records(train_records, tok, cfg.max_len, cfg.train_on_prompt)
    if not examples:
        raise LoraForgeError(f"{cfg.data}: no record has a trained token within max_len={cfg.max_len}")
    rows = pack_examples(examples, cfg.max_len) if cfg.pack else examples
    val = encode_records(val_records, tok, cfg.max_len, cfg.train_on_prompt) if val_records else []
    return rows, val


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

