"""Training-step workers: loraforge vs PEFT (LoRA) and vs PEFT + bitsandbytes (QLoRA).

Both sides get the same model weights, the same batches and the same initial A/B (``lora_init``), load
the tokenizer (``load_model`` always does; ~0.1 GB resident), run AdamW on the adapter only, and report
per-step wall time, the losses (for the parity check) and memory: the peak while loading and the peak
while training (VmHWM reset in between).
"""

from __future__ import annotations

import sys

import torch

from ..procstat import reset_peak_rss, rss_bytes
from .setting import Setting, StepTimer, add_ours, add_peft, batches, setup_process


def _train(s: Setting, model, forward, params, load_peak: int) -> dict:
    """Run `s.steps` AdamW steps of `forward(ids) -> loss`; time and measure them."""
    opt = torch.optim.AdamW(params, lr=s.lr)
    after_load = rss_bytes()["rss"]
    reset_peak_rss()
    timer, losses = StepTimer(), []
    for ids in batches(s, model.config.vocab_size):
        if s.lockstep:
            sys.stdin.readline()  # the runner's go-ahead
        with timer:
            loss = forward(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if s.lockstep:
            print("step-done", flush=True)
    train_peak = rss_bytes()["peak"]
    return {
        "step_s": timer.median(s.timed_from),
        "best_step_s": min(timer.wall[s.timed_from - 1:]),
        "steps_wall": timer.wall,
        "steps_cpu": timer.cpu,
        "losses": losses,
        "tokens_per_s": s.batch * s.seq / timer.median(s.timed_from),
        "rss_after_load": after_load,
        "load_peak_rss": load_peak,
        "train_peak_rss": train_peak,
        "peak_rss": max(load_peak, train_peak),
        "trainable": sum(p.numel() for p in params),
    }


def ours(s: Setting, quantize: str | None = None) -> dict:
    from ..lora import set_trainable_params
    from ..model import load_model

    setup_process(s)
    model, _ = load_model(s.model, device="cpu", dtype=s.dtype, quantize=quantize)
    load_peak = rss_bytes()["peak"]
    add_ours(model, s)
    params = set_trainable_params(model, "bench")
    model.gradient_checkpointing = s.grad_checkpointing
    model.train()
    torch.set_flush_denormal(True)  # as loraforge's trainer does (see train/trainer.py)
    from ..train.heap import release_free_heap

    def forward(ids):
        release_free_heap()  # as loraforge's trainer does around its forward
        loss = model(ids, labels=ids)
        release_free_heap()
        return loss

    res = _train(s, model, forward, params, load_peak)
    res["dtype"] = str(model.model.embed_tokens.weight.dtype).replace("torch.", "")
    return res


def peft(s: Setting, quantize: str | None = None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .setting import model_folder

    setup_process(s)
    kw = {}
    if quantize is not None:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if s.autocast else torch.float32)
        kw["device_map"] = "cpu"
    base = AutoModelForCausalLM.from_pretrained(str(model_folder(s)), dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(str(model_folder(s)))  # as load_model does for ours
    load_peak = rss_bytes()["peak"]
    model = add_peft(base, s)
    if s.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def forward(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=s.autocast):
            return model(input_ids=ids, labels=ids).loss

    res = _train(s, model, forward, params, load_peak)
    res["dtype"] = "float32 + bf16 autocast" if s.autocast else "float32"
    del tokenizer  # held to the end, like a training script's
    return res


def ours_qlora(s: Setting) -> dict:
    try:
        return ours(s, quantize="nf4")
    except ImportError as e:  # the quant package's loader has not landed yet
        return {"pending": f"load_model(quantize='nf4') unavailable ({e})"}


def peft_qlora(s: Setting) -> dict:
    return peft(s, quantize="nf4")
