"""Flags shared by the commands that load a model, and the loading they imply."""

from __future__ import annotations

import argparse

from ..errors import LoraForgeError


def add_model_args(p: argparse.ArgumentParser, quantize: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="SRC", default=None,
                   help="Hugging Face model folder or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)")
    if quantize:
        g.add_argument("--quantize", default=None, choices=["nf4", "fp4", "int8"],
                       help="quantize the frozen base weights on load (NF4 + double quantization = QLoRA)")


def load_from_args(args: argparse.Namespace):
    from ..model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, quantize=getattr(args, "quantize", None))


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
