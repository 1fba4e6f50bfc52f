"""The training loop: AdamW with warm-up + cosine, gradient accumulation and clipping, periodic
validation, atomic checkpoints and exact resume.

    from loraforge.train import TrainConfig, train
    result = train(TrainConfig(data="pirate.jsonl", out="runs/pirate", max_steps=100))

Exact resume: the batch order is a pure function of (seed, epoch) with a saved position, the learning
rate a pure function of the step, and the checkpoint holds the trained tensors, AdamW's moments and the
RNG states (LoRA dropout draws from torch's). A run killed after checkpoint N and resumed therefore
takes bit-for-bit the same steps as one that never stopped.

Several processes (torchrun, see distributed.py): one global sampler cuts the data into global
micro-batches of batch_size x processes rows, and rank r trains on the r-th slice of each. The loss is
the sum of per-token losses over the global count of trained tokens, so N processes take the same
steps as one process with the same global batch.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import LoraForgeError
from ..paths import DiskFullError, atomic_write_text, is_disk_full
from . import checkpoint as ckpt
from . import distributed
from .config import TrainConfig
from .evaluate import batch_loss, mean_loss, perplexity, trained_tokens
from .heap import release_free_heap
from .methods import Trainable, base_quantization, prepare
from .metrics import MetricsLog
from .plot import plot_losses
from .schedule import default_warmup, lr_at
from .startup import check_out_dir, check_resumable, encode, read_data, seed_everything

log = logging.getLogger("loraforge")

# Test hook: SIGKILL ourselves right after this step's checkpoint is on disk (tests kill-and-resume);
# with several processes, only the rank KILL_RANK_ENV names (all of them when it is unset).
KILL_ENV = "LORAFORGE_TEST_KILL_AFTER_CHECKPOINT"
KILL_RANK_ENV = "LORAFORGE_TEST_KILL_RANK"


@dataclass
class TrainResult:
    out: Path
    steps: int
    train_loss: float  # the last step's
    val_loss: float | None  # at the end; None without validation data
    best_val_loss: float | None
    tokens: int  # non-padding tokens seen
    # The trained model (adapter "default" active, eval mode) and its tokenizer, for scoring right away.
    model: torch.nn.Module | None = field(default=None, repr=False)
    tokenizer: object = field(default=None, repr=False)


def train(cfg: TrainConfig, *, resume: bool = False, progress: bool | None = None) -> TrainResult:
    """Train an adapter as `cfg` says and leave a PEFT adapter folder at cfg.out.

    resume: continue from the newest checkpoint in cfg.out (a fresh start when there is none).
    progress: show a progress bar on stderr (default: when stderr is a terminal).

    Data errors surface before anything is written. A non-finite loss or gradient stops the run with a
    LoraForgeError; the checkpoints written so far are kept.
    """
    if not cfg.data:
        raise LoraForgeError("no training data: pass a data file (or set `data:` in the config)")
    cfg = cfg.with_absolute_paths()  # DIR/config.yaml then repeats the run from any working directory
    dist, device, joined = distributed.setup(cfg.device)
    level = log.level
    if not dist.main:  # one voice: rank 0 logs and shows progress; other ranks speak only to fail
        log.setLevel(logging.ERROR)
        progress = False
    try:
        return _train(cfg, resume, progress, dist, device)
    finally:
        log.setLevel(level)
        if joined:
            distributed.shutdown(dist)


def _train(cfg: TrainConfig, resume: bool, progress: bool | None, dist: distributed.Dist, device) -> TrainResult:
    out = Path(cfg.out)
    last = check_out_dir(out, resume, dist)
    if last is not None:
        check_resumable(last, cfg, dist)

    train_records, val_records = read_data(cfg)
    from ..model import load_model

    model, tok = load_model(cfg.model, device=device, dtype=cfg.dtype, quantize=base_quantization(cfg.method))
    rows, val_examples = encode(cfg, tok, train_records, val_records)
    device = model.inv_freq.device

    # AdamW's second moments of tiny LoRA gradients fall below 1e-38: on x86 CPUs every arithmetic op on
    # such denormals is ~100x slower, which made the optimizer step cost as much as the model's matmuls.
    # Flushing them to zero changes nothing a float32 training run can resolve.
    torch.set_flush_denormal(True)
    seed_everything(cfg.seed)  # adapter init draws from torch's generator
    trainable = prepare(model, cfg)
    from ..lora import trainable_report

    log.info("%s: %s", cfg.method, trainable_report(model))
    fwd, manual_sync = distributed.wrap(model, cfg.strategy, dist, trainable.params,
                                        outside_forward=cfg.method == "prefix")
    if dist.active:  # the adapter's init above is the same on every rank; its dropout draws must not be
        torch.manual_seed(int(np.random.SeedSequence([cfg.seed, dist.rank]).generate_state(1)[0]))
    params = list(trainable.params.values())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    from ..data import Batcher

    # one global order: each global micro-batch holds batch_size rows per process
    batcher = Batcher(rows, cfg.batch_size * dist.world, seed=cfg.seed)
    total = cfg.max_steps or max(1, math.ceil((cfg.epochs or 1.0) * len(batcher) / cfg.grad_accum))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else default_warmup(total)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing = True

    run = _Run(cfg, out, model, tok, trainable, optimizer, batcher, val_examples, total, warmup, dist, fwd, manual_sync)
    if last is not None:
        run.restore(last)
    elif dist.main:
        out.mkdir(parents=True, exist_ok=True)
        run.metrics.start(None)
    if dist.main:
        atomic_write_text(out / "config.yaml", cfg.to_yaml())  # the settings this run actually uses
    dist.barrier()
    log.info("training %d steps (%d per epoch of %d rows, global batch %d = batch %d x %d process%s x %d "
             "accumulation%s) on %s; warm-up %d steps", total, math.ceil(len(batcher) / cfg.grad_accum), len(rows),
             cfg.batch_size * dist.world * cfg.grad_accum, cfg.batch_size, dist.world, "es" * (dist.world > 1),
             cfg.grad_accum, f", {cfg.strategy}" if dist.active else "", run.device, warmup)
    try:
        return run.loop(progress)
    finally:
        # a process-wide setting (torch has no getter): back to torch's default for whatever runs next
        torch.set_flush_denormal(False)


class _Run:
    """The state of one training run and the steps it takes."""

    def __init__(self, cfg, out, model, tok, trainable: Trainable, optimizer, batcher, val_examples, total, warmup,
                 dist: distributed.Dist | None = None, fwd=None, manual_sync=()):
        self.cfg, self.out, self.model, self.tok = cfg, out, model, tok
        self.dist = dist or distributed.Dist()
        self.fwd = fwd if fwd is not None else model  # what training forwards call (DDP, FSDP, the model)
        self.manual_sync = list(manual_sync)  # trained tensors whose gradients no wrapper sums over ranks
        self.trainable, self.optimizer, self.batcher = trainable, optimizer, batcher
        self.val_examples, self.total, self.warmup = val_examples, total, warmup
        self.device = model.inv_freq.device
        self.metrics = MetricsLog(out / "metrics.jsonl")
        self.step, self.tokens, self.best_val = 0, 0, None
        self.last_saved: Path | None = None
        self.last_eval_step = -1
        self.loss = math.nan
        self.val_loss: float | None = None

    # -- resume ---------------------------------------------------------------------------------------------
    def restore(self, path: Path) -> None:
        state = ckpt.load_checkpoint(path, self.trainable.params, self.optimizer, self.dist)
        self.batcher.load_state_dict(state["sampler"])
        self.step, self.tokens, self.best_val = state["step"], state["tokens"], state["best_val_loss"]
        self.loss, self.val_loss = state.get("loss", math.nan), state.get("val_loss")
        self.last_saved = path
        if self.dist.main:
            self.metrics.start(self.step)
        elif self.metrics.path.exists():  # read only: rank 0 owns the file
            from .metrics import read_metrics

            self.metrics.records = [r for r in read_metrics(self.metrics.path) if r.get("step", 0) <= self.step]
        if not state["rng_restored"] and self.cfg.dropout > 0 and self.cfg.method != "prefix":
            log.info("%s was saved by %d process(es): dropout draws continue from a fresh seed per rank", path,
                     state.get("processes", 1))
        if any(r["step"] == self.step and "val_loss" in r for r in self.metrics.records):
            self.last_eval_step = self.step  # evaluated just before this checkpoint: not again at the end
        log.info("resuming from %s (step %d)", path, self.step)

    # -- the loop -------------------------------------------------------------------------------------------
    def loop(self, progress: bool | None) -> TrainResult:
        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        cfg = self.cfg
        self.model.train()
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=(not progress) if progress is not None else None, leave=False)
        with self.stopping_cleanly(), bar, logging_redirect_tqdm(loggers=[log]):
            while self.step < self.total:
                t0 = time.perf_counter()
                lr, grad_norm, n_tokens = self.train_step()
                dt = time.perf_counter() - t0
                mem = self.memory()
                if self.dist.main:
                    self.metrics.append({"step": self.step, "epoch": round(self.epoch(), 4), "loss": self.loss, "lr": lr,
                                         "grad_norm": grad_norm, "tokens": self.tokens,
                                         "tokens_per_s": round(n_tokens / dt, 1), **mem})
                bar.set_postfix(loss=f"{self.loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_tokens / dt:.0f}", refresh=False)
                bar.update(1)  # redraws, postfix included
                if cfg.eval_every and self.step % cfg.eval_every == 0:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save()
        with self.stopping_cleanly():
            if self.last_eval_step != self.step:
                self.evaluate()
            if self.last_saved is None or self.last_saved.name != f"step-{self.step}":
                self.save()
            self.model.eval()
            self.write_adapter()
        log.info("wrote adapter to %s (%d steps, train loss %.4f%s)", self.out, self.step, self.loss,
                 f", validation loss {self.val_loss:.4f}" if self.val_loss is not None else "")
        return TrainResult(self.out, self.step, self.loss, self.val_loss, self.best_val, self.tokens, self.model, self.tok)

    def my_rows(self) -> tuple[list, bool]:
        """This rank's slice of the next global micro-batch, and whether it has any rows. A rank whose slice
        of a short last batch is empty still runs a forward and backward (the collectives need every rank),
        on one borrowed row that counts for nothing."""
        rows = self.batcher.next_batch()
        b = self.cfg.batch_size
        mine = rows[self.dist.rank * b: (self.dist.rank + 1) * b]
        return (mine, True) if mine else (rows[:1], False)

    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step over grad_accum micro-batches. Returns (lr, gradient norm, input tokens over
        all ranks)."""
        cfg, params, dist = self.cfg, list(self.trainable.params.values()), self.dist
        from ..data import collate

        slices = [self.my_rows() for _ in range(cfg.grad_accum)]
        batches = [collate(rows, self.tok.pad_token_id) for rows, _ in slices]
        counts = [trained_tokens(b["labels"]) if real else 0 for b, (_, real) in zip(batches, slices, strict=True)]
        n_inputs = sum(int((b["input_ids"] != self.tok.pad_token_id).sum()) if real else 0
                       for b, (_, real) in zip(batches, slices, strict=True))
        n_total, n_inputs = dist.sum([sum(counts), n_inputs])
        n_total, n_inputs = max(1.0, n_total), int(n_inputs)
        loss_sum = 0.0
        for i, (b, n) in enumerate(zip(batches, counts, strict=True)):
            # Weighted by trained tokens over all micro-batches of all ranks: the gradient of the sum of
            # per-token losses / their global count. DDP and FSDP average over ranks, hence x world.
            release_free_heap()
            with distributed.accumulating(self.fwd, last=i == len(batches) - 1):
                loss = batch_loss(self.fwd, b, self.device, self.trainable.batch_kwargs)
                release_free_heap()  # the forward's temporaries, before the backward allocates its own
                if not dist.active and not torch.isfinite(loss):
                    self.stop(self.step + 1, f"the loss is {float(loss.detach())}")
                (loss * (n / n_total * dist.world)).backward()
            loss_sum += float(loss.detach()) * n / n_total
        if dist.active:  # every rank stops together, or none does
            (loss_sum,) = dist.sum([loss_sum])
            if not math.isfinite(loss_sum):
                self.stop(self.step + 1, f"the loss is {loss_sum}")
        distributed.sync_grads(dist, self.manual_sync)
        grad_norm = distributed.clip_grad_norm(params, cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            self.stop(self.step + 1, f"the gradient norm is {grad_norm}")
        lr = lr_at(self.step, cfg.lr, self.warmup, self.total)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.loss = loss_sum
        self.tokens += n_inputs
        return lr, grad_norm, n_inputs

    @contextlib.contextmanager
    def stopping_cleanly(self):
        """An interrupt (Ctrl-C, or SIGTERM, which the CLI turns into one) abandons the step under way and a
        full disk stops the run; either way the user learns which checkpoint is intact."""
        try:
            yield
        except KeyboardInterrupt:
            log.warning("training stopped during step %d; %s", self.step + 1, self.resume_hint())
            raise
        except Exception as e:
            if self.dist.active and distributed.is_peer_loss(e):
                raise LoraForgeError(f"step {self.step + 1}: another training process stopped (killed, or failed "
                                     f"on its own), so this one stopped too; {self.resume_hint()}") from None
            if not is_disk_full(e):
                raise
            what = e.path if isinstance(e, DiskFullError) else getattr(e, "filename", None) or self.out
            raise LoraForgeError(f"{what}: no space left on the device at step {self.step}, so training stopped; "
                                 f"{self.resume_hint()}") from None

    def resume_hint(self) -> str:
        if self.last_saved is None:
            return "no checkpoint was written before it"
        return f"the last checkpoint, {self.last_saved}, is intact (continue with --resume)"

    def stop(self, step: int, what: str) -> None:
        where = (f"the last good checkpoint is {self.last_saved} (continue with --resume and a lower --lr)"
                 if self.last_saved else "no checkpoint was written before it")
        raise LoraForgeError(f"step {step}: {what}, so training stopped; {where}")

    def epoch(self) -> float:
        return self.batcher.epoch + self.batcher.step / len(self.batcher)

    # -- evaluation, checkpoints, outputs -------------------------------------------------------------------
    def evaluate(self) -> None:
        self.last_eval_step = self.step
        if self.val_examples:
            self.val_loss = mean_loss(self.model, self.val_examples, self.tok.pad_token_id, self.cfg.batch_size,
                                      self.trainable.batch_kwargs)
            if not math.isfinite(self.val_loss):
                self.stop(self.step, f"the validation loss is {self.val_loss}")
            best = self.best_val is None or self.val_loss < self.best_val
            if self.dist.main:
                self.metrics.append({"step": self.step, "val_loss": self.val_loss,
                                     "val_perplexity": perplexity(self.val_loss), "best": best})
            log.info("step %d: train loss %.4f, validation loss %.4f (perplexity %.2f)%s", self.step, self.loss,
                     self.val_loss, perplexity(self.val_loss), ", best so far" if best else "")
            if best:
                self.best_val = self.val_loss
                self.save_adapter_to(self.out / "best")
        if self.dist.main:
            self.plot()

    def save(self) -> None:
        state = {"sampler": self.batcher.state_dict(), "tokens": self.tokens, "best_val_loss": self.best_val,
                 "loss": self.loss, "val_loss": self.val_loss,
                 "schedule": {"lr": self.cfg.lr, "warmup": self.warmup, "total": self.total},
                 "config": self.cfg.to_dict()}
        self.last_saved = ckpt.save_checkpoint(self.out, self.step, self.trainable.params, self.optimizer, state,
                                               self.cfg.keep_checkpoints, self.dist)
        if os.environ.get(KILL_ENV) == str(self.step) and os.environ.get(KILL_RANK_ENV, str(self.dist.rank)) == str(
                self.dist.rank):
            os.kill(os.getpid(), signal.SIGKILL)

    def memory(self) -> dict[str, list[int]]:
        """Each rank's resident memory now and at its peak, in MiB (what sharding saves shows here)."""
        from ..procstat import rss_bytes

        mem, n = rss_bytes(), self.dist.world
        mine = [0.0] * (2 * n)
        mine[self.dist.rank], mine[n + self.dist.rank] = mem["rss"] / 2**20, mem["peak"] / 2**20
        total = self.dist.sum(mine)
        return {"rss_mb": [round(v) for v in total[:n]], "peak_rss_mb": [round(v) for v in total[n:]]}

    def save_adapter_to(self, folder: Path) -> None:
        """Rank 0 writes the adapter (every rank takes part in gathering sharded tensors)."""
        with distributed.gathered(self.model, self.trainable.params):
            if self.dist.main:
                self.trainable.save(folder)
        self.dist.barrier()

    def plot(self) -> None:
        title = f"{self.cfg.method} r={self.cfg.rank}, lr={self.cfg.lr:g}, {Path(self.cfg.data).name}"
        plot_losses(self.out / "loss.png", self.metrics.train_losses(), self.metrics.val_losses(), title)

    def write_adapter(self) -> None:
        """Put the adapter's files into DIR beside the run's other files, each by an atomic rename."""
        tmp = self.out / ".adapter.tmp"
        self.save_adapter_to(tmp)
        if not self.dist.main:
            return
        files = sorted(tmp.iterdir(), key=lambda p: p.suffix == ".json")  # the config last: it marks completion
        for f in files:
            os.replace(f, self.out / f.name)
        shutil.rmtree(tmp, ignore_errors=True)
