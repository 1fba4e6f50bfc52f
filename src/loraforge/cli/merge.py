"""`loraforge merge`: base + adapter folded into one plain Hugging Face model folder."""

from __future__ import annotations

import logging

from ..errors import LoraForgeError
from .common import add_model_args, load_from_args

log = logging.getLogger("loraforge")


def register(p):
    p.add_argument("--adapter", metavar="DIR", required=True, help="a LoRA adapter folder (PEFT format)")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="where to write the merged model (a new or empty folder unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder at --out (never one that holds the adapter or model)")
    add_model_args(p, computes=False)


def run(args) -> int:
    from ..adapters import adapter_kind, attach_adapter
    from ..lora.merge_export import write_merged_folder
    from ..paths import check_output_dir

    inputs = [args.adapter, *([args.model] if args.model else [])]
    check_output_dir(args.out, overwrite=args.overwrite, inputs=inputs)  # before the minutes of loading
    if adapter_kind(args.adapter) != "LORA":
        raise LoraForgeError(f"{args.adapter}: only LoRA adapters can be merged into the weights")
    model, tok = load_from_args(args)
    name = attach_adapter(model, args.adapter)
    out = write_merged_folder(model, tok, args.out, name, overwrite=args.overwrite,
                              inputs=[*inputs, model.source_folder])
    log.info("wrote merged model to %s (loads with transformers.AutoModelForCausalLM.from_pretrained)", out)
    return 0
