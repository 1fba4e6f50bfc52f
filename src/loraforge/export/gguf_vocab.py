"""The tokenizer part of a GGUF model file (``tokenizer.ggml.*`` and ``tokenizer.chat_template``).

A model we converted from a GGUF file (the embedded SmolLM2) carries that file's own tokenizer metadata,
copied as it is: it is what llama.cpp was given for this vocabulary, pre-tokenizer name included. A Hugging
Face folder with a byte-level BPE ``tokenizer.json`` gets the gpt2-style keys built from it; special token
ids, merges and the chat template are read by gguf's SpecialVocab.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import LoraForgeError

log = logging.getLogger("loraforge")


def source_gguf(folder: Path | None) -> Path | None:
    """The GGUF file a converted folder came from (loraforge_source.json), if it is still there."""
    if folder is None or not (Path(folder) / "loraforge_source.json").is_file():
        return None
    gguf = json.loads((Path(folder) / "loraforge_source.json").read_text()).get("gguf")
    return Path(gguf) if gguf and Path(gguf).is_file() else None


def add_tokenizer(w, folder: Path | None, vocab_size: int) -> None:
    """Write the tokenizer keys of the model in `folder` (whose embedding has `vocab_size` rows) to `w`."""
    src = source_gguf(folder)
    if src is not None:
        _copy_from_gguf(w, src)
    elif folder is not None and (Path(folder) / "tokenizer.json").is_file():
        _from_tokenizer_json(w, Path(folder), vocab_size)
    else:
        raise LoraForgeError(f"{folder}: no tokenizer.json; GGUF export needs the model's tokenizer")


def _copy_from_gguf(w, src: Path) -> None:
    import gguf

    for key, field in gguf.GGUFReader(str(src)).fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub)


def _from_tokenizer_json(w, folder: Path, vocab_size: int) -> None:
    import gguf

    path = folder / "tokenizer.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    kind = (data.get("model") or {}).get("type")
    if kind != "BPE":
        raise LoraForgeError(f"{path}: a {kind} tokenizer; GGUF export writes byte-level BPE (gpt2-style) "
                             "tokenizers only")
    ids = dict(data["model"]["vocab"])
    added = {int(t["id"]): t for t in data.get("added_tokens", [])}
    top = max([*ids.values(), *added, -1]) + 1
    if top > vocab_size:
        raise LoraForgeError(f"{path}: the tokenizer has {top} tokens but the model's embedding only {vocab_size}")
    # Embedding rows beyond the tokenizer are padding tokens, as llama.cpp expects one token per row.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [gguf.TokenType.UNUSED] * vocab_size
    for tok, i in ids.items():
        tokens[i], types[i] = tok, gguf.TokenType.NORMAL
    for i, t in added.items():
        tokens[i] = t["content"]
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    # llama.cpp names its pre-tokenizer regexes per model family; "default" is its generic byte-level one.
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
