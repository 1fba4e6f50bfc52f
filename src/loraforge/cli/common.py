"""Flags shared by the commands that load a model, and the loading they imply."""

from __future__ import annotations

import argparse

from ..errors import LoraForgeError


def add_model_args(p: argparse.ArgumentParser, quantize: bool = True, computes: bool = True) -> None:
    """computes=False: a command that writes weights rather than computing with them (merge, quantize),
    where `--dtype auto` keeps full precision instead of asking the hardware for speed."""
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="SRC", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    auto = ("auto (the default) = bfloat16 on CUDA and on CPUs that multiply bf16 fast (AMX, checked by a "
            "timed product), else float32" if computes else "auto (the default) = float32 for this command")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help=f"compute dtype; {auto}")
    p.set_defaults(_dtype_computes=computes)
    if quantize:
        g.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8"],
                       help="quantize the frozen base weights on load (NF4 + double quantization = QLoRA)")


def load_from_args(args: argparse.Namespace):
    from ..model import load_model

    dtype = args.dtype
    if dtype == "auto" and not getattr(args, "_dtype_computes", True):
        dtype = None  # the library's default: fp32 on CPU
    return load_model(args.model, device=args.device, dtype=dtype, quantize=getattr(args, "quantize", None))


def parse_named_adapters(values: list[str] | None) -> list[tuple[str, str]]:
    """`NAME=DIR` pairs (a bare DIR is named after its folder)."""
    from pathlib import Path

    out = []
    for v in values or []:
        if "=" in v:
            name, path = v.split("=", 1)
            if not name:
                raise LoraForgeError(f"--adapter {v!r}: empty name before '='")
        else:
            name, path = Path(v).resolve().name, v
        out.append((name, path))
    names = [n for n, _ in out]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise LoraForgeError(f"--adapter: name {sorted(dup)[0]!r} given twice")
    return out
