"""`loraforge info PATH`: what a model folder, a .gguf file, an adapter or a training checkpoint is.

Nothing is loaded into memory and nothing is converted: the facts come from config.json, the JSON
headers of the safetensors files (checked in full, so a truncated or lying file is reported, not
described) and the GGUF file's own metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from ..errors import LoraForgeError


def register(p):
    p.add_argument("path", nargs="?", default=None,
                   help="a model folder, a .gguf file, an adapter folder or a training checkpoint "
                        "(default: the embedded model)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args) -> int:
    info = describe(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if isinstance(v, list):
                v = ", ".join(map(str, v))
            elif isinstance(v, dict):
                v = ", ".join(f"{a}: {b}" for a, b in v.items())
            print(f"{k:<{width}}  {v}")
    return 0


def describe(path: str | None) -> dict:
    if path is None:
        return model_info(None)
    from ..model.files import shown

    p = Path(path)
    try:
        gguf = p.is_file() and p.suffix == ".gguf"
        adapter = (p / "adapter_config.json").exists()
        checkpoint = (p / "state.json").is_file() and (p / "trainable.safetensors").exists()
    except OSError as e:  # a name too long for the file system
        raise LoraForgeError(f"{shown(path)}: cannot read ({e.strerror or e})") from None
    if gguf:
        return gguf_info(p)
    if adapter:
        return adapter_info_checked(p)
    if checkpoint:
        return checkpoint_info(p)
    return model_info(path)


def model_info(src: str | None) -> dict:
    from ..model.budget import parameter_counts
    from ..model.config import ARCHITECTURES
    from ..model.files import safetensors_header
    from ..model.loading import read_config, resolve_source, weight_files
    from ..quant.checkpoint import spec_from_config, stored_quantized

    source = resolve_source(src)
    cfg = read_config(source.folder)
    files = weight_files(source.folder)
    headers = {f: safetensors_header(f) for f in files}
    stored = stored_quantized(k for h in headers.values() for k in h)
    size = sum(f.stat().st_size for f in files)
    if stored:
        # a quantized weight is several tensors (codes, scales, code tables): count it as its in x out values
        n = sum(parameter_counts(cfg)[:2])
    else:
        n = sum(_numel(info["shape"]) for h in headers.values() for info in h.values())
    arch = (cfg.hf_config.get("architectures") or [ARCHITECTURES[cfg.model_type]])[0]
    out = {
        "name": source.name,
        "path": str(source.folder),
        "architecture": arch,
        "parameters": n,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": f"{cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value",
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings,
        "size_on_disk_bytes": size,
    }
    if stored:
        spec = spec_from_config(cfg.hf_config, str(source.folder / "config.json"))
        kinds = sorted(set(stored.values()))
        out["quantization"] = ", ".join(kinds) + (" with double quantization" if spec and spec.double_quant else "")
        out["quantized_linears"] = len(stored)
    out["bits_per_parameter"] = round(8 * size / max(n, 1), 2)
    return out


def gguf_info(path: Path) -> dict:
    """The .gguf file itself: its size, quantization (file type and tensor types) and shape."""
    from gguf import GGUFReader, LlamaFileType

    from ..model.embedded import cached_folder

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - the gguf reader raises many types for a malformed file
        raise LoraForgeError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = _gguf_field(reader, "general.architecture")
    n = sum(int(t.n_elements) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    file_type = _gguf_field(reader, "general.file_type")
    try:
        file_type = LlamaFileType(file_type).name.removeprefix("MOSTLY_") if file_type is not None else None
    except ValueError:
        pass
    size = path.stat().st_size
    out = {
        "name": _gguf_field(reader, "general.name") or path.stem,
        "path": str(path),
        "format": f"GGUF v{_gguf_field(reader, 'GGUF.version')}",
        "architecture": arch,
        "quantization": file_type,
        "tensor_types": dict(types.most_common()),
        "parameters": n,
        "bits_per_parameter": round(8 * size / max(n, 1), 2),
        "layers": _gguf_field(reader, f"{arch}.block_count"),
        "hidden_size": _gguf_field(reader, f"{arch}.embedding_length"),
        "heads": f"{_gguf_field(reader, f'{arch}.attention.head_count')} query / "
                 f"{_gguf_field(reader, f'{arch}.attention.head_count_kv')} key-value",
        "context_length": _gguf_field(reader, f"{arch}.context_length"),
        "size_on_disk_bytes": size,
    }
    cache = cached_folder(path)
    out["converted_folder"] = str(cache) if cache else "(not converted yet: loading it converts it once, to fp32)"
    return out


def _gguf_field(reader, key: str):
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return None
    if hasattr(field, "contents"):  # gguf >= 0.11
        return field.contents()
    part = field.parts[field.data[0]]  # older readers: a scalar or a string's bytes
    return bytes(part).decode() if field.types[0] == GGUFValueType.STRING else part.tolist()[0]


def adapter_info_checked(path: Path) -> dict:
    """adapter_info, after checking what loading would check: the config and every tensor in full."""
    from ..lora.peft_io import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        adapter_info,
        lora_config_from_peft,
        read_adapter_config,
        read_adapter_tensors,
    )
    from ..model.files import safetensors_header

    info = adapter_info(path)
    weights = path / WEIGHTS_FILE
    if weights.exists():
        safetensors_header(weights)  # a truncated or lying header, in one sentence
    tensors = read_adapter_tensors(path)  # and the values: no NaN or infinity
    if info.get("method") in ("LORA", None):
        lora_config_from_peft(read_adapter_config(path), str(path / CONFIG_FILE))
    info["parameters"] = sum(t.numel() for t in tensors.values())
    info["tensors"] = len(tensors)
    return info


def checkpoint_info(path: Path) -> dict:
    """A training checkpoint (runs/X/checkpoints/step-N): its step, its run and the adapter tensors inside."""
    from ..model.files import read_json_object, safetensors_header

    state = read_json_object(path / "state.json", "a checkpoint's state.json")
    header = safetensors_header(path / "trainable.safetensors")
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    out = {
        "kind": "training checkpoint (resume it with `loraforge train ... --resume`; it is not an adapter folder)",
        "path": str(path),
        "step": state.get("step"),
        "run": str(run_dir) if run_dir else None,
        "method": config.get("method"),
        "model": config.get("model"),
        "trainable_tensors": len(header),
        "trainable_parameters": sum(_numel(i["shape"]) for i in header.values()),
        "best_val_loss": state.get("best_val_loss"),
    }
    if config.get("method") in ("lora", "qlora"):
        out["rank"], out["alpha"] = config.get("rank"), config.get("alpha")
    if run_dir and (run_dir / "adapter_config.json").exists():
        out["run_adapter"] = f"{run_dir} (the adapter the run saved last; load that one)"
    return out


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
