"""The full fine-tuning reference row: will it fit, and if so train every weight for the same steps.

It runs the adapters' loop with nothing frozen: the same batches in the same order (`Batcher` with the
same seed), the same warm-up + cosine schedule, clipping and AdamW, and metrics.jsonl in the trainer's
format so that the report reads every row the same way. No checkpoints and no weights are written:
a copy of the model per comparison is not worth the disk.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

from .. import procstat
from ..errors import LoraForgeError

log = logging.getLogger("loraforge")

ADAMW_BYTES_PER_PARAM = 4 + 4 + 8  # fp32 weight, its gradient, AdamW's two moments


def activation_bytes(dims: dict[str, int], batch: int, seq: int) -> int:
    """A rough upper bound on the fp32 activations autograd keeps for one batch of `batch` x `seq` tokens,
    used only when no adapter run measured them: per layer and token the norm outputs and residuals (~8h),
    k and v (2 x kv width), the MLP's gate, up, activation and product (4 x intermediate), and the
    attention probabilities of CPU's unfused attention (heads x seq)."""
    h, inter, layers = dims["hidden_size"], dims["intermediate_size"], dims["num_hidden_layers"]
    kv = dims["num_key_value_heads"] * dims["head_dim"]
    per_token = 8 * h + 2 * kv + 4 * inter + dims["num_attention_heads"] * seq
    return 4 * batch * seq * layers * per_token


def available_memory() -> int:
    """Bytes this process could still allocate (MemAvailable, or less where a cgroup limit is lower)."""
    avail = procstat.available_memory()
    if avail is None:
        raise LoraForgeError("full fine-tuning: cannot read the available memory from /proc/meminfo; "
                             "pass --no-full to leave that row out")
    return avail


def plan(n_params: int, activations: int, available: int) -> dict:
    """{"need", "available", "fits", "activations"}: weights, gradients and AdamW state for every parameter,
    plus the activations, against what the machine has free."""
    need = n_params * ADAMW_BYTES_PER_PARAM + activations
    return {"need": need, "available": available, "fits": need <= available, "activations": activations}


def skip_reason(p: dict) -> str:
    return f"skipped: needs ~{p['need'] / 1e9:.1f} GB, {p['available'] / 1e9:.1f} GB available"


def train_full(cfg, out: Path):
    """Train every parameter of cfg.model for cfg.max_steps steps; returns (model, tokenizer) in eval mode."""
    from ..data import Batcher, collate, encode_records
    from ..model import load_model
    from ..train.evaluate import batch_loss, mean_loss, perplexity
    from ..train.metrics import MetricsLog
    from ..train.plot import plot_losses
    from ..train.schedule import default_warmup, lr_at
    from .measure import read_split

    train_records, val_records = read_split(cfg)
    model, tok = load_model(cfg.model, device=cfg.device, dtype="float32")
    device = model.inv_freq.device
    examples = encode_records(train_records, tok, cfg.max_len, cfg.train_on_prompt)
    if not examples:
        raise LoraForgeError(f"{cfg.data}: no record has a trained token within max_len={cfg.max_len}")
    val = encode_records(val_records, tok, cfg.max_len, cfg.train_on_prompt) if val_records else []

    torch.manual_seed(cfg.seed)
    params = list(model.parameters())  # a tied embedding once
    for p in params:
        p.requires_grad_(True)
    base_lr, total = cfg.lr_for("full"), cfg.max_steps
    warmup = default_warmup(total)
    optimizer = torch.optim.AdamW(params, lr=base_lr, betas=(0.9, 0.999), weight_decay=0.0)
    batcher = Batcher(examples, cfg.batch_size, seed=cfg.seed)  # the adapters' batch order
    metrics = MetricsLog(out / "metrics.jsonl")
    out.mkdir(parents=True, exist_ok=True)
    metrics.start(None)
    every, tokens = cfg.evals_every(), 0
    model.train()
    for step in range(1, total + 1):
        t0 = time.perf_counter()
        batch = collate(batcher.next_batch(), tok.pad_token_id)
        loss = batch_loss(model, batch, device)
        if not torch.isfinite(loss):
            raise LoraForgeError(f"full fine-tuning, step {step}: the loss is {float(loss)}; "
                                 "try a lower --lr full=...")
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))  # TrainConfig's max_grad_norm
        lr = lr_at(step - 1, base_lr, warmup, total)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        n = int((batch["input_ids"] != tok.pad_token_id).sum())
        tokens += n
        dt = time.perf_counter() - t0
        value = float(loss.detach())
        metrics.append({"step": step, "loss": value, "lr": lr, "grad_norm": grad_norm,
                        "tokens": tokens, "tokens_per_s": round(n / dt, 1)})
        if val and ((every and step % every == 0) or step == total):
            v = mean_loss(model, val, tok.pad_token_id, cfg.batch_size)
            if not math.isfinite(v):
                raise LoraForgeError(f"full fine-tuning, step {step}: the validation loss is {v}; "
                                     "try a lower --lr full=...")
            metrics.append({"step": step, "val_loss": v, "val_perplexity": perplexity(v)})
            log.info("full fine-tuning step %d: train loss %.4f, validation loss %.4f", step, value, v)
    plot_losses(out / "loss.png", metrics.train_losses(), metrics.val_losses(), f"full fine-tuning, lr={base_lr:g}")
    model.eval()
    return model, tok
