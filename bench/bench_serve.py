"""Multi-adapter decoding: our engine against PEFT on the embedded SmolLM2-135M, in one run.

    .venv/bin/python bench/bench_serve.py [--prompts 8] [--new-tokens 32] [--repeats 3] [--threads 2]

Rows (greedy, every row generates exactly --new-tokens tokens, prefill included in the time):
  (a)  ours: one batch, every row on the same adapter
  (b)  ours: one batch, each row on a different adapter (one forward, per-row adapter ids)
  (a') PEFT: transformers' generate on a batch with one active adapter (PEFT's best case)
  (c)  PEFT: transformers' generate on a mixed batch, generate(adapter_names=[...])
  (d)  PEFT: set_adapter then generate, one request after another
Adapters: r=16, alpha=32 on every linear layer, random non-zero B. Runs are interleaved round by round and
the best of --repeats rounds is reported (the medians are in the JSON too): on a shared machine the best
run is the one least disturbed by other processes. Prints a table; writes bench/serve_results.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from loraforge.generate import SamplingParams, encode_prompt  # noqa: E402
from loraforge.lora import LoraConfig, add_lora, delete_adapter, get_adapter_params, save_adapter  # noqa: E402
from loraforge.model import load_model  # noqa: E402
from loraforge.paths import atomic_write_json  # noqa: E402
from loraforge.serve import Engine  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Write a haiku about the sea.", "How do I boil an egg?",
    "Explain photosynthesis in one sentence.", "Name three primary colours.", "What is 12 times 12?",
    "Give me a tip for learning a language.", "Why do cats purr?", "What is a prime number?",
    "Describe a sunset.", "Who wrote Hamlet?", "What does a compiler do?",
]


def make_adapters(model, out: Path, n: int) -> list[Path]:
    dirs = []
    for i in range(n):
        name = f"ad{i}"
        add_lora(model, name, LoraConfig(r=16, alpha=32, dropout=0.0, targets="all-linear"), activate=False)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for key, p in get_adapter_params(model, name).items():
                if key.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        dirs.append(save_adapter(model, name, out / name))
        delete_adapter(model, name)
    return dirs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).with_name("serve_results.json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, N = args.prompts, args.new_tokens

    model, tok = load_model(None, device="cpu", dtype="float32")
    tmp = tempfile.TemporaryDirectory()
    dirs = make_adapters(model, Path(tmp.name), B)
    names = [f"ad{i}" for i in range(B)]
    prompts = [encode_prompt(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(B)]
    # min_tokens = N holds back end-of-sequence for all N tokens, as min_new_tokens does for transformers
    sp = SamplingParams(max_new_tokens=N, min_tokens=N)

    engine = Engine(model, tok, max_batch=B, max_len=max(map(len, prompts)) + N + 1)
    for name, d in zip(names, dirs, strict=True):
        engine.load_adapter(name, d)

    # PEFT on transformers' own model, the same weights and adapter folders.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model.source_folder), dtype=torch.float32).eval()
    # the same end-of-sequence ids on both sides, so that both suppress the same tokens until N are out
    eos = hf.generation_config.eos_token_id
    engine.eos = {eos} if isinstance(eos, int) else set(eos or [])
    peft = PeftModel.from_pretrained(hf, str(dirs[0]), adapter_name=names[0])
    for name, d in zip(names[1:], dirs[1:], strict=True):
        peft.load_adapter(str(d), adapter_name=name)
    L = max(map(len, prompts))
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (L - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (L - len(p)) + [1] * len(p) for p in prompts])
    gen_kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=pad)

    def ours(adapters):
        return [c.token_ids for c in engine.generate(prompts, sp, adapters)]

    def peft_one():
        peft.set_adapter(names[0])
        with torch.no_grad():
            return peft.generate(input_ids=ids, attention_mask=mask, **gen_kw)[:, L:].tolist()

    def peft_mixed():
        with torch.no_grad():
            return peft.generate(input_ids=ids, attention_mask=mask, adapter_names=names, **gen_kw)[:, L:].tolist()

    def peft_serial():
        out = []
        for p, name in zip(prompts, names, strict=True):
            peft.set_adapter(name)
            with torch.no_grad():
                out += peft.generate(input_ids=torch.tensor([p]), **gen_kw)[:, len(p):].tolist()
        return out

    runs = {
        "a": ("ours, one adapter for all rows", lambda: ours([names[0]] * B)),
        "b": (f"ours, {B} adapters mixed in one batch", lambda: ours(names)),
        "a'": ("PEFT, one adapter for all rows", peft_one),
        "c": ("PEFT mixed batch, generate(adapter_names=...)", peft_mixed),
        "d": ("PEFT, set_adapter per request, serially", peft_serial),
    }
    print(f"warming up ({B} prompts x {N} new tokens, {args.threads} threads)...", file=sys.stderr)
    outputs = {}
    for k, (_, fn) in runs.items():
        dt, outputs[k] = timed(fn)
        print(f"  {k}: {dt:.1f}s", file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for k, (_, fn) in runs.items():
            dt, _ = timed(fn)
            times[k].append(dt)
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in runs), file=sys.stderr)

    tokens = B * N
    tps = {k: tokens / min(v) for k, v in times.items()}
    tps_median = {k: tokens / statistics.median(v) for k, v in times.items()}
    # ours vs theirs on the same mixed batch: how many rows give the same greedy tokens
    same_b_c = sum(x == y for x, y in zip(outputs["b"], outputs["c"], strict=True))
    same_a_a = sum(x == y for x, y in zip(outputs["a"], outputs["a'"], strict=True))

    print(f"\nmulti-adapter decoding, embedded SmolLM2-135M fp32 CPU, {B} prompts x {N} new tokens, greedy, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'run':<5}{'what':<48}{'tok/s':>8}{'vs (a)':>8}{'vs (c)':>8}")
    for k, (what, _) in runs.items():
        print(f"{k:<5}{what:<48}{tps[k]:>8.1f}{tps[k] / tps['a']:>8.2f}{tps[k] / tps['c']:>8.2f}")
    print(f"targets: (b)/(a) = {tps['b'] / tps['a']:.2f} (>= 0.8), (b)/(c) = {tps['b'] / tps['c']:.2f} (>= 2)")
    print(f"greedy agreement with PEFT: (b) vs (c) {same_b_c}/{B} rows, (a) vs (a') {same_a_a}/{B} rows")

    result = {
        "model": engine.base_name, "dtype": "float32", "device": "cpu", "threads": args.threads,
        "prompts": B, "new_tokens": N, "repeats": args.repeats, "adapter_rank": 16, "adapters": B,
        "platform": platform.platform(), "torch": torch.__version__,
        "runs": {k: {"what": w, "tokens_per_s": tps[k], "tokens_per_s_median": tps_median[k], "seconds": times[k]}
                 for k, (w, _) in runs.items()},
        "ratios": {"b_over_a": tps["b"] / tps["a"], "b_over_c": tps["b"] / tps["c"], "b_over_d": tps["b"] / tps["d"]},
        "greedy_rows_equal": {"b_vs_c": same_b_c, "a_vs_a_prime": same_a_a},
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
