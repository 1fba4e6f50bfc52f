"""Resolve `--model SRC` and load it: the embedded default, a Hugging Face folder, or a .gguf file.

The model is built on the meta device and each tensor is read from safetensors and assigned in place
(``assign=True`` semantics), so loading never holds two copies of the weights. With ``quantize`` each
linear weight is quantized as soon as it is read: the full-precision model never exists whole.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from .config import ModelConfig
from .embedded import EMBEDDED_NAME, converted_folder, embedded_gguf
from .llama import Linear, LlamaForCausalLM, rope_inv_freq

log = logging.getLogger("loraforge")

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelSource:
    folder: Path  # a Hugging Face folder: config.json, *.safetensors, tokenizer files
    name: str  # what users call it (base_model_name_or_path in adapter configs)


def resolve_source(src: str | None) -> ModelSource:
    if src is None or src == "" or src == EMBEDDED_NAME or src.endswith("/" + EMBEDDED_NAME):
        return ModelSource(converted_folder(embedded_gguf()), EMBEDDED_NAME)
    p = Path(src).expanduser()
    if not p.exists():
        raise LoraForgeError(f"{src}: no such file or folder (pass a Hugging Face model folder or a .gguf file)")
    if p.is_file():
        if p.suffix != ".gguf":
            raise LoraForgeError(f"{src}: a model is a Hugging Face folder or a .gguf file, not a {p.suffix or 'plain'} file")
        return ModelSource(converted_folder(p), p.stem)
    if not (p / "config.json").exists():
        raise LoraForgeError(f"{src}: not a model folder (no config.json)")
    name = p.name
    src_json = p / "loraforge_source.json"
    if src_json.exists():
        name = json.loads(src_json.read_text()).get("name", name)
    return ModelSource(p, name)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as e:
            raise LoraForgeError(f"{index}: malformed index ({e})") from None
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise LoraForgeError(
            f"{folder}: only pickle weights (*.bin/*.pt) found; loraforge loads safetensors only, because "
            "unpickling runs code. Convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise LoraForgeError(f"{folder}: no weights (*.safetensors) in this folder")


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    try:
        raw = json.loads(path.read_text())
    except ValueError as e:
        raise LoraForgeError(f"{path}: not valid JSON ({e})") from None
    return ModelConfig.from_hf(raw, str(path))


def default_device_dtype(device: str | None, dtype: str | torch.dtype | None) -> tuple[torch.device, torch.dtype]:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        # On CPU bf16 matmuls are ~100x slower than fp32; on CUDA bf16 is the fast path.
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    elif isinstance(dtype, torch.dtype):
        dt = dtype
    else:
        if dtype not in DTYPES:
            raise LoraForgeError(f"--dtype {dtype!r}: choose one of float32, bfloat16, float16")
        dt = DTYPES[dtype]
    return dev, dt


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        setattr(mod, attr, t)


def load_model(
    src: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> tuple[LlamaForCausalLM, object]:
    """Load a base model and its tokenizer. Returns (model, tokenizer); the model is frozen and in eval mode."""
    from safetensors import SafetensorError, safe_open

    t0 = time.perf_counter()
    source = resolve_source(src)
    cfg = read_config(source.folder)
    dev, dt = default_device_dtype(device, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    quantizer = None
    if quantize is not None:
        from ..quant import quantize_weight_on_load  # imported lazily: quantization is optional

        quantizer = quantize_weight_on_load(quantize)
    expected = set(model.state_dict().keys())
    if cfg.tie_word_embeddings:
        expected.discard("lm_head.weight")
    seen: set[str] = set()
    for file in weight_files(source.folder):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if key.endswith("rotary_emb.inv_freq"):
                        continue
                    if cfg.tie_word_embeddings and key == "lm_head.weight":
                        continue
                    if quantizer is not None and quantizer.handles(model, key):
                        quantizer.load(model, key, f, dev, dt, seen)
                        continue
                    if key not in expected:
                        raise LoraForgeError(f"{file}: unexpected tensor {key!r}; is this a {cfg.model_type} checkpoint?")
                    t = f.get_tensor(key)
                    want = model.get_parameter(key) if key in dict(model.named_parameters()) else None
                    if want is not None and tuple(t.shape) != tuple(want.shape):
                        raise LoraForgeError(
                            f"{file}: tensor {key} has shape {tuple(t.shape)}, config.json implies {tuple(want.shape)}"
                        )
                    _set_tensor(model, key, t.to(device=dev, dtype=dt if t.is_floating_point() else t.dtype))
                    seen.add(key)
        except SafetensorError as e:
            raise LoraForgeError(f"{file}: corrupt safetensors file ({e})") from None
        except OSError as e:
            raise LoraForgeError(f"{file}: cannot read ({e})") from None
    missing = sorted(expected - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoraForgeError(f"{source.folder}: weights missing from the checkpoint: {', '.join(missing[:3])}{more}")
    model.tie_weights()
    model.inv_freq = rope_inv_freq(cfg).to(dev)  # buffers built on meta hold no data
    model.requires_grad_(False)
    model.eval()
    model.name_or_path = source.name
    model.source_folder = source.folder
    tok = load_tokenizer(source.folder)
    n = count_parameters(model)
    log.info(
        "loaded %s: %s parameters, %s on %s%s (%.1fs)",
        source.name, human(n), str(dt).replace("torch.", ""), dev,
        f", {quantize} base" if quantize else "", time.perf_counter() - t0,
    )
    return model, tok


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise LoraForgeError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(model: nn.Module) -> int:
    """Parameters as stored (a tied embedding counts once; a 4-bit weight counts its logical size)."""
    seen, n = set(), 0
    for m in model.modules():
        if hasattr(m, "out_features") and hasattr(m, "in_features") and not isinstance(m, (nn.Linear,)) and hasattr(m, "quant_type"):
            n += m.in_features * m.out_features
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


__all__ = ["load_model", "load_tokenizer", "resolve_source", "count_parameters", "Linear", "ModelSource"]
