"""`loraforge export`: an adapter (or base + adapter merged) in the formats other programs load.

--to hf            base + adapter merged into a plain Hugging Face folder (what `loraforge merge` writes)
--to gguf          base + adapter merged into one GGUF model file (llama.cpp, Ollama); no --adapter: the base
--to gguf-adapter  the adapter alone as llama.cpp's LoRA GGUF, applied on the base's GGUF at run time
--to ollama        a folder with a Modelfile, the base GGUF and the adapter GGUF (`ollama create`)
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..errors import LoraForgeError
from .common import add_model_args, load_from_args

log = logging.getLogger("loraforge")

TARGETS = ("hf", "gguf", "gguf-adapter", "ollama")


def register(p):
    p.add_argument("--to", required=True, choices=TARGETS, help="the format to write (see above)")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="a LoRA adapter folder (PEFT format); optional for --to gguf (then the base alone)")
    p.add_argument("--out", metavar="PATH", required=True,
                   help="the file (gguf, gguf-adapter) or folder (hf, ollama) to write")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="weight type of --to gguf (norms and biases stay f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output written by loraforge")
    p.add_argument("--base", metavar="SRC", default=None,
                   help="the adapter's base model, same as --model (default: the adapter's "
                        "base_model_name_or_path when it is a local path, else the embedded model)")
    add_model_args(p, computes=False)
    p.description = __doc__.split("\n\n", 1)[1]


def base_for(adapter: str | None, given: str | None) -> str | None:
    """The base model to load: --model/--base, else the adapter's base_model_name_or_path when it names a
    local folder or file (the adapters we save on a local model record its absolute path), else the
    embedded model, refused when the adapter names a different base that is not on this machine."""
    from ..lora.peft_io import CONFIG_FILE, read_adapter_config
    from ..model.embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME

    if given or adapter is None:
        return given
    named = read_adapter_config(adapter).get("base_model_name_or_path")
    if not named or named in (EMBEDDED_HUB_ID, EMBEDDED_NAME):
        return None
    if Path(named).exists():
        return named
    raise LoraForgeError(f"{Path(adapter) / CONFIG_FILE}: base_model_name_or_path {named!r} is not a local folder "
                         "or .gguf file; pass --model with that base model")


def run(args) -> int:
    from ..adapters import adapter_kind, attach_adapter
    from ..paths import check_output_dir, check_output_file

    if args.to != "gguf" and args.adapter is None:
        raise LoraForgeError(f"--to {args.to} needs --adapter DIR")
    if args.model and args.base and args.model != args.base:
        raise LoraForgeError("--model and --base name different models; pass one of them")
    if args.adapter is not None and adapter_kind(args.adapter) != "LORA":
        raise LoraForgeError(f"{args.adapter}: peft_type {adapter_kind(args.adapter)!r}: only LoRA adapters can be "
                             "exported (llama.cpp and merging take LoRA weights only)")
    args.model = base_for(args.adapter, args.model or args.base)
    if args.to == "hf":
        from . import merge

        return merge.run(args)
    inputs = [p for p in (args.adapter, args.model) if p]
    if args.to == "ollama":
        check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs, marker="Modelfile")
    else:
        check_output_file(args.out, overwrite=args.overwrite, inputs=inputs)
    model, tok = load_from_args(args)
    if args.to != "ollama":
        check_output_file(args.out, overwrite=args.overwrite, inputs=[model.source_folder, *_gguf_of(model)])
    name = attach_adapter(model, args.adapter) if args.adapter else None
    if args.to == "gguf-adapter":
        from ..export.gguf_adapter import write_adapter_gguf

        out = write_adapter_gguf(model, name, args.out, base_name=model.name_or_path)
        log.info("wrote %s (llama.cpp: --lora %s on the base's GGUF)", out, out)
    elif args.to == "gguf":
        from ..export.gguf_model import write_model_gguf

        out = write_model_gguf(model, args.out, name, outtype=args.outtype, name=model.name_or_path)
        log.info("wrote %s (%s%s)", out, args.outtype, ", adapter merged" if name else "")
    else:
        from ..export.ollama import write_ollama_dir

        out = write_ollama_dir(model, tok, name, args.out)
        log.info("wrote %s; create the model with: ollama create NAME -f %s", out, Path(out) / "Modelfile")
    return 0


def _gguf_of(model) -> list[Path]:
    from ..export.gguf_vocab import source_gguf

    src = source_gguf(getattr(model, "source_folder", None))
    return [src] if src else []
