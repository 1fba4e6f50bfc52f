"""Generation workers: greedy decoding with one adapter, loraforge (adapter live or merged) vs PEFT.

Prompts are seeded random token ids of one length (no padding), every system generates exactly
`gen_tokens` new tokens (no stopping at end-of-sequence), and the adapter has non-zero B so that it
changes the output; the generated ids come back so the runner can check that the systems agree.
"""

from __future__ import annotations

import time

import torch

from .setting import TARGETS, Setting, lora_init, model_folder, rss_bytes, setup_process

B_STD = 0.02  # a visible but harmless adapter


def prompts(s: Setting, batch: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(s.seed + 100 + batch)
    return torch.randint(0, vocab, (batch, s.gen_prompt), generator=g)


def _measure(s: Setting, vocab: int, run) -> dict:
    """run(ids [B, P], n_new) -> new ids [B, n_new]; tokens/s per batch size, after a short warm-up.

    Each batch size is generated twice and the faster time kept: background load only adds time."""
    run(prompts(s, 1, vocab), 2)
    out = {}
    for b in s.gen_batches:
        ids, best = prompts(s, b, vocab), float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            new = run(ids, s.gen_tokens)
            best = min(best, time.perf_counter() - t0)
        out[f"b{b}"] = {"s": best, "tokens_per_s": b * s.gen_tokens / best, "ids": new[0].tolist()}
    out["peak_rss"] = rss_bytes()["peak"]
    return out


def _ours(s: Setting, merged: bool) -> dict:
    from ..generate import SamplingParams, generate_ids
    from ..lora import LoraConfig, add_lora, lora_layers, merge_adapter
    from ..model import load_model

    setup_process(s)
    model, _ = load_model(s.model, device="cpu", dtype="float32")
    add_lora(model, "bench", LoraConfig(r=s.r, alpha=s.alpha, dropout=0.0, targets=list(TARGETS)))
    layers = dict(lora_layers(model))
    init = lora_init({p: (m.out_features, m.in_features) for p, m in layers.items()}, s.r, s.seed, B_STD)
    with torch.no_grad():
        for p, (A, B) in init.items():
            layers[p].lora_A["bench"].copy_(A)
            layers[p].lora_B["bench"].copy_(B)
    if merged:
        merge_adapter(model, "bench")

    def run(ids, n):
        params = SamplingParams(max_new_tokens=n, temperature=0.0)
        return torch.tensor(generate_ids(model, ids.tolist(), params, eos_ids=set()))

    return _measure(s, model.config.vocab_size, run)


def ours(s: Setting) -> dict:
    return _ours(s, merged=False)


def ours_merged(s: Setting) -> dict:
    return _ours(s, merged=True)


def peft(s: Setting) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    setup_process(s)
    base = AutoModelForCausalLM.from_pretrained(str(model_folder(s)), dtype=torch.float32)
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg).eval()
    prefix = "base_model.model."
    layers = {n[len(prefix):]: m for n, m in model.named_modules()
              if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    shapes = {p: (m.lora_B["default"].out_features, m.lora_A["default"].in_features) for p, m in layers.items()}
    with torch.no_grad():
        for p, (A, B) in lora_init(shapes, s.r, s.seed, B_STD).items():
            layers[p].lora_A["default"].weight.copy_(A)
            layers[p].lora_B["default"].weight.copy_(B)
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0

    @torch.no_grad()
    def run(ids, n):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out[:, ids.shape[1]:]

    return _measure(s, base.config.vocab_size, run)
