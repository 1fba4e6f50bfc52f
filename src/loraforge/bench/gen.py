"""Generation workers: greedy decoding with one adapter, loraforge (adapter live or merged) vs PEFT.

Prompts are seeded random token ids of one length (no padding), every system generates exactly
`gen_tokens` new tokens (no stopping at end-of-sequence), and the adapter has non-zero B so that it
changes the output; the generated ids come back so the runner can check that the systems agree.
"""

from __future__ import annotations

import time

import torch

from ..procstat import rss_bytes
from .setting import Setting, add_ours, add_peft, model_folder, setup_process

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
    from ..lora import merge_adapter
    from ..model import load_model

    setup_process(s)
    model, _ = load_model(s.model, device="cpu", dtype="float32")
    add_ours(model, s, B_STD)
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
    from transformers import AutoModelForCausalLM

    setup_process(s)
    base = AutoModelForCausalLM.from_pretrained(str(model_folder(s)), dtype=torch.float32)
    model = add_peft(base, s, B_STD).eval()
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0

    @torch.no_grad()
    def run(ids, n):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=pad)
        return out[:, ids.shape[1]:]

    return _measure(s, base.config.vocab_size, run)
