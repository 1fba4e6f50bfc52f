"""Quantization report on the embedded model (SmolLM2-135M): size, accuracy against bitsandbytes, load cost.

    .venv/bin/python bench/quant_report.py [--model SRC] [--threads 1] [--out bench/quant_report.json]

Prints one table per question and writes everything to JSON:
  bits      stored bits per weight value (codes + scales + tables), per quantization type
  recon     every linear weight quantized by us and by bitsandbytes (the anchor, run here): max |ours - bnb|
            after dequantizing, and both against the fp32 original: relative Frobenius error
  memory    bytes of the loaded model's weights: linears and everything else (embeddings, norms)
  load      wall time and peak RSS of load_model in a fresh process (VmHWM minus the RSS after imports):
            fp32, quantize-on-load, and the folder written by `loraforge quantize`. The tokenizer's share is
            its own row. Weights kept memory-mapped are resident only once used, hence "after forward".
  drift     ||logits_q - logits_fp32|| / ||logits_fp32|| over a few prompts, and top-1 agreement
Timings are noisy on shared CPUs; the byte counts and errors are exact.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

QUANT_TYPES = ("nf4", "fp4", "int8")
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence why the sky is blue.",
    "List three prime numbers greater than ten.",
]


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


# -- child process: one load, measured alone ----------------------------------------------------


def child(src: str, quantize: str | None, threads: int) -> None:
    torch.set_num_threads(threads)
    from transformers import AutoTokenizer  # noqa: F401  imported before the baseline, as load_model uses it

    from loraforge.model import load_model

    with torch.device("meta"):  # building on meta imports more of torch (~70 MB, once per process)
        torch.nn.Linear(1, 1)
    base = status_kib("VmRSS")
    t0 = time.perf_counter()
    if src == "tokenizer":  # the tokenizer's share of every load below
        from loraforge.model import resolve_source
        from loraforge.model.loading import load_tokenizer

        load_tokenizer(resolve_source(quantize).folder)
        print(json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": (status_kib("VmHWM") - base) / 1024,
                          "resident_mib": (status_kib("VmRSS") - base) / 1024}))
        return
    model, _ = load_model(src, device="cpu", dtype="float32", quantize=quantize)
    out = {"seconds": time.perf_counter() - t0, "peak_mib": (status_kib("VmHWM") - base) / 1024,
           "resident_mib": (status_kib("VmRSS") - base) / 1024}
    # Memory-mapped weights are only resident once touched: one short forward touches them all.
    with torch.no_grad():
        model(torch.arange(8)[None])
    out["resident_after_forward_mib"] = (status_kib("VmRSS") - base) / 1024
    print(json.dumps(out))


def measure_load(src: str, quantize: str | None, threads: int, repeats: int, env: dict | None = None) -> dict:
    """Median over `repeats` fresh processes of each number (glibc's heap makes peaks vary run to run)."""
    cmd = [sys.executable, __file__, "--child", src, "--child-quantize", quantize or "", "--threads", str(threads)]
    runs = []
    for _ in range(repeats):
        r = subprocess.run(cmd, capture_output=True, text=True, check=True, env=None if env is None else
                           {**os.environ, **env})
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out = {k: statistics.median(run[k] for run in runs) for k in runs[0]}
    out["peak_mib_range"] = [min(run["peak_mib"] for run in runs), max(run["peak_mib"] for run in runs)]
    return out


# -- in-process measurements --------------------------------------------------------------------


def linear_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from loraforge.model.llama import LlamaForCausalLM
    from loraforge.model.loading import read_config
    from loraforge.quant.linear import linear_names

    with torch.device("meta"):
        names = linear_names(LlamaForCausalLM(read_config(folder)))
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {f"{n}.weight": f.get_tensor(f"{n}.weight").float() for n in names}


def reconstruction(weights: dict[str, torch.Tensor]) -> dict:
    from loraforge.quant import bits_per_parameter, dequantize, quantize

    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None
    out = {}
    for quant_type in QUANT_TYPES:
        err2 = bnb_err2 = ref2 = 0.0
        max_diff, bits, n = 0.0, 0.0, 0
        for w in weights.values():
            state = quantize(w, quant_type, 64, True)
            ours = dequantize(state, torch.float32)
            err2 += (ours - w).double().pow(2).sum().item()
            ref2 += w.double().pow(2).sum().item()
            bits += bits_per_parameter(state) * w.numel()
            n += w.numel()
            if bnb is not None and quant_type != "int8":  # bitsandbytes has no blockwise linear int8 weight
                packed, qs = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
                theirs = bnb.dequantize_4bit(packed, qs)
                max_diff = max(max_diff, (ours - theirs).abs().max().item())
                bnb_err2 += (theirs - w).double().pow(2).sum().item()
        row = {"bits_per_parameter": bits / n, "ours_rel_frobenius": math.sqrt(err2 / ref2)}
        if bnb is not None and quant_type != "int8":
            row |= {"max_abs_diff_vs_bnb": max_diff, "bnb_rel_frobenius": math.sqrt(bnb_err2 / ref2)}
        out[quant_type] = row
    return out


def model_bytes(model) -> dict:
    from loraforge.quant import QuantLinear, quantized_nbytes

    linear = other = 0
    seen = set()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            linear += quantized_nbytes(m)
        elif isinstance(m, torch.nn.Linear) and not name.endswith("lm_head"):
            linear += m.weight.numel() * m.weight.element_size()
            seen.add(id(m.weight))
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            other += p.numel() * p.element_size()
    return {"linear_bytes": linear, "other_bytes": other, "total_bytes": linear + other}


@torch.no_grad()
def logits(model, tok) -> torch.Tensor:
    from loraforge.generate import encode_prompt

    rows = []
    for prompt in PROMPTS:
        ids = torch.tensor([encode_prompt(tok, prompt, chat=True)])
        rows.append(model(ids)[0])  # [S, vocab]
    return torch.cat(rows)


def drift_and_memory(src: str) -> tuple[dict, dict]:
    from loraforge.model import load_model

    ref_model, tok = load_model(src, device="cpu", dtype="float32")
    ref = logits(ref_model, tok)
    memory, drift = {"fp32": model_bytes(ref_model)}, {}
    del ref_model
    for quant_type in QUANT_TYPES:
        model, _ = load_model(src, device="cpu", dtype="float32", quantize=quant_type)
        memory[quant_type] = model_bytes(model)
        q = logits(model, tok)
        drift[quant_type] = {
            "rel_logit_error": ((q - ref).norm() / ref.norm()).item(),
            "top1_agreement": (q.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "positions": ref.shape[0],
        }
        del model
    drift |= bnb_drift(src, tok, ref)
    return drift, memory


@torch.no_grad()
def bnb_drift(src: str, tok, ref: torch.Tensor) -> dict:
    """The anchor: transformers + bitsandbytes quantizing the same model, same prompts."""
    try:
        import bitsandbytes as bnb
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError:
        return {}
    from transformers.utils import logging as hf_logging

    from loraforge.generate import encode_prompt

    hf_logging.disable_progress_bar()
    out = {}
    for quant_type in ("nf4", "fp4"):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(src, quantization_config=config, device_map="cpu").eval()
        layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
        # exact path first: bitsandbytes' AVX512-BF16 CPU path repacks the weights in place on first use
        for fast in (False, True):
            for m in layers:
                m.support_avx512bf16_for_cpu = fast
            q = torch.cat([model(torch.tensor([encode_prompt(tok, p, chat=True)])).logits[0] for p in PROMPTS])
            out[f"bnb {quant_type}" + (" (bf16 CPU path)" if fast else "")] = {
                "rel_logit_error": ((q - ref).norm() / ref.norm()).item(),
                "top1_agreement": (q.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                "positions": ref.shape[0],
            }
        del model
    return out


# -- report -------------------------------------------------------------------------------------


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[c if isinstance(c, str) else f"{c:.4g}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, r in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 keeps shared-CPU timings sane)")
    ap.add_argument("--repeats", type=int, default=3, help="fresh processes per load measurement (median)")
    ap.add_argument("--out", default=str(Path(__file__).with_suffix(".json")))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-quantize", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child, args.child_quantize or None, args.threads)
        return 0
    torch.set_num_threads(args.threads)

    from loraforge.model import resolve_source
    from loraforge.quant.checkpoint import QuantSpec
    from loraforge.quant.export import write_quantized_model

    source = resolve_source(args.model)
    src = str(source.folder)
    report: dict = {"model": source.name, "threads": args.threads, "torch": torch.__version__}

    report["recon"] = reconstruction(linear_weights(source.folder))
    report["drift"], report["memory"] = drift_and_memory(src)

    n = args.repeats
    load = {"tokenizer only": measure_load("tokenizer", src, args.threads, n),
            "fp32": measure_load(src, None, args.threads, n)}
    with tempfile.TemporaryDirectory() as tmp:
        for quant_type in QUANT_TYPES:
            load[f"{quant_type} on load"] = measure_load(src, quant_type, args.threads, n)
            t0 = time.perf_counter()
            folder = write_quantized_model(src, Path(tmp) / quant_type, QuantSpec(quant_type))
            written = time.perf_counter() - t0
            row = measure_load(str(folder), None, args.threads, n)
            row["write_seconds"] = written
            row["folder_bytes"] = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            load[f"{quant_type} pre-quantized"] = row
    # Freed quantization temporaries that glibc keeps on its heap, not live data: with a fixed mmap
    # threshold, buffers of 1 MiB and more go back to the system when freed.
    load["nf4 on load, MALLOC_MMAP_THRESHOLD_=1MiB"] = measure_load(
        src, "nf4", args.threads, n, env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    report["load"] = load
    report["source_bytes"] = sum(f.stat().st_size for f in source.folder.glob("*.safetensors"))

    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")

    rec = report["recon"]
    table(f"Reconstruction of all {source.name} linear weights (blocksize 64, double quantization)",
          ["type", "bits/param", "rel. Frobenius (ours)", "rel. Frobenius (bnb)", "max |ours - bnb|"],
          [[t, r["bits_per_parameter"], r["ours_rel_frobenius"], r.get("bnb_rel_frobenius", "n/a"),
            r.get("max_abs_diff_vs_bnb", "n/a")] for t, r in rec.items()])
    mem = report["memory"]
    table("Model weights in memory (MB)", ["type", "linears", "other", "total", "vs fp32"],
          [[t, m["linear_bytes"] / 1e6, m["other_bytes"] / 1e6, m["total_bytes"] / 1e6,
            m["total_bytes"] / mem["fp32"]["total_bytes"]] for t, m in mem.items()])
    table(f"load_model in a fresh process ({args.threads} thread(s); peak = VmHWM - RSS after imports; median of {n})",
          ["how", "seconds", "peak MiB", "peak range", "resident MiB", "after forward", "write s", "folder MB"],
          [[k, v["seconds"], v["peak_mib"], "{:.0f}-{:.0f}".format(*v["peak_mib_range"]), v["resident_mib"],
            v.get("resident_after_forward_mib", "-"),
            v.get("write_seconds", "-"),
            v["folder_bytes"] / 1e6 if "folder_bytes" in v else report["source_bytes"] / 1e6]
           for k, v in load.items()])
    table(f"Output drift vs fp32 ({len(PROMPTS)} chat prompts, {report['drift']['nf4']['positions']} positions)",
          ["type", "rel. logit error", "top-1 agreement"],
          [[t, d["rel_logit_error"], d["top1_agreement"]] for t, d in report["drift"].items()])
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
