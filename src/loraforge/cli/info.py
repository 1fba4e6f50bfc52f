"""`loraforge info PATH`: what a model or an adapter folder is."""

from __future__ import annotations

import json
from pathlib import Path


def register(p):
    p.add_argument("path", nargs="?", default=None,
                   help="a model folder, a .gguf file, or an adapter folder (default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    from ..lora.peft_io import adapter_info

    path = args.path
    if path is not None and (Path(path) / "adapter_config.json").exists():
        info = adapter_info(path)
    else:
        info = model_info(path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, list):
                v = ", ".join(map(str, v))
            print(f"{k:<{width}}  {v}")
    return 0


def model_info(src: str | None) -> dict:
    from safetensors import safe_open

    from ..model.loading import read_config, resolve_source, weight_files

    source = resolve_source(src)
    cfg = read_config(source.folder)
    n = 0
    quantized = False
    for f in weight_files(source.folder):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                quantized |= ".absmax" in k or "quant_state" in k
                if "." in k and not any(s in k for s in (".absmax", ".quant_map", ".nested_", ".quant_state")):
                    n += st.get_slice(k).get_shape() and _numel(st.get_slice(k).get_shape())
    size = sum(f.stat().st_size for f in weight_files(source.folder))
    from ..model.config import ARCHITECTURES

    arch = (cfg.hf_config.get("architectures") or [ARCHITECTURES[cfg.model_type]])[0]
    return {
        "name": source.name,
        "path": str(source.folder),
        "architecture": arch,
        "parameters": n if not quantized else "(quantized; see size)",
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value",
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings,
        "size_on_disk_bytes": size,
    }


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
