"""Multi-adapter decoding: our engine against PEFT, and `loraforge serve` against vLLM CPU, on the embedded
SmolLM2-135M, in one run.

    .venv/bin/python bench/bench_serve.py [--prompts 8] [--new-tokens 32] [--repeats 3] [--threads 2]
                                          [--dtype float32|bfloat16] [--no-peft] [--no-vllm]

Rows (greedy, every row generates exactly --new-tokens tokens, prefill included in the time):
  (a)  ours: one batch, every row on the same adapter
  (b)  ours: one batch, each row on a different adapter (one forward, per-row adapter ids)
  (a') PEFT: transformers' generate on a batch with one active adapter (PEFT's best case)
  (c)  PEFT: transformers' generate on a mixed batch, generate(adapter_names=[...])
  (d)  PEFT: set_adapter then generate, one request after another
  (e)  `loraforge serve` over HTTP: --prompts concurrent /v1/completions requests on one adapter
  (f)  `loraforge serve` over HTTP: the same requests, each on a different adapter
  (g)  vLLM CPU (interop/setup_vllm.sh's venv) over HTTP, as (e): the server a user would pick for many adapters
  (h)  vLLM CPU over HTTP, as (f) (--max-loras = --prompts, so every adapter shares the batch)
(e)-(h) send token-id prompts with temperature 0 and min_tokens = max_tokens = --new-tokens to servers started
here (both in --dtype: fp32 by default; bfloat16 is what each picks by default on a CPU with fast bf16, such
as AMX; the same adapter folders); a request round is timed from the first send to the last answer.
Adapters: r=16, alpha=32 on every linear layer, random non-zero B. Runs are interleaved round by round and
the best of --repeats rounds is reported (the medians are in the JSON too): on a shared machine the best
run is the one least disturbed by other processes. Prints a table; writes bench/serve_results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from loraforge.bench import servers  # noqa: E402
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
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="every row's compute dtype (PEFT's rows: its model cast to it)")
    ap.add_argument("--peft", action=argparse.BooleanOptionalAction, default=True, help="rows (a'), (c), (d)")
    ap.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True,
                    help="rows (e)-(h): loraforge serve against vLLM CPU (needs interop/setup_vllm.sh)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("serve_results.json")))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    B, N = args.prompts, args.new_tokens

    model, tok = load_model(None, device="cpu", dtype=args.dtype)
    tmp = tempfile.TemporaryDirectory()
    dirs = make_adapters(model, Path(tmp.name), B)
    names = [f"ad{i}" for i in range(B)]
    prompts = [encode_prompt(tok, QUESTIONS[i % len(QUESTIONS)]) for i in range(B)]
    # min_tokens = N holds back end-of-sequence for all N tokens, as min_new_tokens does for transformers
    sp = SamplingParams(max_new_tokens=N, min_tokens=N)

    engine = Engine(model, tok, max_batch=B, max_len=max(map(len, prompts)) + N + 1)
    for name, d in zip(names, dirs, strict=True):
        engine.load_adapter(name, d)

    def ours(adapters):
        return [c.token_ids for c in engine.generate(prompts, sp, adapters)]

    runs = {
        "a": ("ours, one adapter for all rows", lambda: ours([names[0]] * B)),
        "b": (f"ours, {B} adapters mixed in one batch", lambda: ours(names)),
    }
    if args.peft:
        runs.update(peft_runs(model, tok, engine, prompts, names, dirs, N))
    with contextlib.ExitStack() as stack:
        if args.vllm:
            runs.update(http_runs(stack, model.source_folder, prompts, names, dirs, N, Path(tmp.name), args.threads,
                                  args.dtype))
        outputs, times = measure(runs, args.repeats, f"{B} prompts x {N} new tokens, {args.threads} threads")

    tokens = B * N
    tps = {k: tokens / min(v) for k, v in times.items()}
    tps_median = {k: tokens / statistics.median(v) for k, v in times.items()}
    ratios = {"b_over_a": tps["b"] / tps["a"]}
    if args.peft:
        ratios |= {"b_over_c": tps["b"] / tps["c"], "b_over_d": tps["b"] / tps["d"]}
    if args.vllm:
        ratios |= {"f_over_h": tps["f"] / tps["h"], "e_over_g": tps["e"] / tps["g"]}
    # ours vs theirs on the same batch: how many rows give the same greedy tokens (or text, over HTTP)
    agree = {f"{x}_vs_{y}": sum(p == q for p, q in zip(outputs[x], outputs[y], strict=True))
             for x, y in (("b", "c"), ("a", "a'"), ("f", "h"), ("e", "g")) if x in outputs and y in outputs}

    print(f"\nmulti-adapter decoding, embedded SmolLM2-135M {args.dtype} CPU, {B} prompts x {N} new tokens, greedy, "
          f"{args.threads} threads, best of {args.repeats}")
    print(f"{'run':<5}{'what':<58}{'tok/s':>8}{'vs (a)':>8}")
    for k, (what, _) in runs.items():
        print(f"{k:<5}{what:<58}{tps[k]:>8.1f}{tps[k] / tps['a']:>8.2f}")
    print("ratios: " + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items())
          + "   (targets: b/a >= 0.8, b/c >= 2, f/h >= 1.5)")
    print("greedy rows equal: " + ", ".join(f"{k} {v}/{B}" for k, v in agree.items()))

    result = {
        "model": engine.base_name, "dtype": args.dtype, "device": "cpu", "threads": args.threads,
        "prompts": B, "new_tokens": N, "repeats": args.repeats, "adapter_rank": 16, "adapters": B,
        "platform": platform.platform(), "torch": torch.__version__, "vllm": vllm_version() if args.vllm else None,
        "runs": {k: {"what": w, "tokens_per_s": tps[k], "tokens_per_s_median": tps_median[k], "seconds": times[k]}
                 for k, (w, _) in runs.items()},
        "ratios": ratios,
        "greedy_rows_equal": agree,
    }
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


SETTLE_S = 1.5  # vLLM's workers keep a CPU busy for ~1 s after a request (0.95 CPUs in the next second, 0.02
#                after that): each run starts on a quiet machine, not in the previous run's tail


def measure(runs, repeats: int, what: str):
    """One warm-up call of each run, then `repeats` rounds, the runs interleaved within each round."""
    print(f"warming up ({what})...", file=sys.stderr)
    outputs = {}
    for k, (_, fn) in runs.items():
        dt, outputs[k] = timed(fn)
        print(f"  {k}: {dt:.1f}s", file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(repeats):
        for k, (_, fn) in runs.items():
            time.sleep(SETTLE_S)
            dt, _ = timed(fn)
            times[k].append(dt)
        print(f"round {r + 1}/{repeats}: " + ", ".join(f"{k} {times[k][-1]:.2f}s" for k in runs), file=sys.stderr)
    return outputs, times


def peft_runs(model, tok, engine, prompts, names, dirs, N):
    """Rows (a'), (c), (d): PEFT on transformers' own model, the same weights and adapter folders."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model.source_folder),
                                              dtype=model.model.embed_tokens.weight.dtype).eval()
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

    return {"a'": ("PEFT, one adapter for all rows", peft_one),
            "c": ("PEFT mixed batch, generate(adapter_names=...)", peft_mixed),
            "d": ("PEFT, set_adapter per request, serially", peft_serial)}


def http_runs(stack, folder: Path, prompts, names, dirs, N, tmp: Path, threads: int, dtype: str):
    """Rows (e)-(h): `loraforge serve` and vLLM CPU started here (both stay up for the whole measurement,
    idle while the other runs), each sent the same concurrent requests. Both compute on `threads` CPUs:
    torch's threads for ours, vLLM's OpenMP threads bound to CPUs 0..threads-1."""
    if not servers.vllm_python().exists():
        sys.exit(f"{servers.vllm_python()} is missing: run interop/setup.sh first, or pass --no-vllm")
    B = len(prompts)
    adapters = dict(zip(names, dirs, strict=True))
    max_len = max(map(len, prompts)) + N + 8
    ports = {"loraforge": servers.free_port(), "vllm": servers.free_port()}
    starts = {
        "loraforge": (servers.loraforge_command(folder, ports["loraforge"], adapters, max_batch=B,
                                                max_model_len=max_len, dtype=dtype),
                      {**os.environ, "OMP_NUM_THREADS": str(threads)}),
        "vllm": (servers.vllm_command(folder, ports["vllm"], adapters, max_rank=16, max_loras=B, max_num_seqs=B,
                                      max_model_len=max_len, dtype=dtype), servers.vllm_env(threads)),
    }
    urls = {}
    for system, (cmd, env) in starts.items():
        print(f"starting {system} (log: {tmp / system}.log)...", file=sys.stderr)
        urls[system] = stack.enter_context(servers.running(system, cmd, ports[system], tmp / f"{system}.log", env=env))
    client = stack.enter_context(httpx.Client(timeout=600))
    pool = stack.enter_context(ThreadPoolExecutor(B))

    def send(system: str, models: list[str]) -> list[str]:
        def one(i: int) -> str:
            r = client.post(f"{urls[system]}/v1/completions", json={
                "model": models[i], "prompt": prompts[i], "max_tokens": N, "min_tokens": N, "temperature": 0})
            r.raise_for_status()
            return r.json()["choices"][0]["text"]
        return list(pool.map(one, range(B)))

    return {"e": ("loraforge serve (HTTP), one adapter for all rows", lambda: send("loraforge", [names[0]] * B)),
            "f": (f"loraforge serve (HTTP), {B} adapters mixed", lambda: send("loraforge", names)),
            "g": ("vLLM CPU (HTTP), one adapter for all rows", lambda: send("vllm", [names[0]] * B)),
            "h": (f"vLLM CPU (HTTP), {B} adapters mixed", lambda: send("vllm", names))}


def vllm_version() -> str:
    r = subprocess.run([str(servers.vllm_python()), "-c", "import vllm; print(vllm.__version__)"],
                       capture_output=True, text=True, env=servers.vllm_env())
    return r.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
