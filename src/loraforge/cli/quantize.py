"""`loraforge quantize`: write a pre-quantized (NF4 / FP4 / INT8) copy of a model folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .common import add_model_args

log = logging.getLogger("loraforge")

EPILOG = """\
The copy loads with `--model DIR` without re-quantizing, and gives the same outputs as `--quantize` on
the original. NF4/FP4 folders use the bitsandbytes layout, so transformers + bitsandbytes load them
too. Every linear layer but lm_head is quantized; embeddings, norms and biases are kept as they are
(--dtype casts them, and becomes the compute dtype recorded in config.json). MoE models (Mixtral,
Qwen3-MoE): the experts are quantized too, one weight per expert, the router never; transformers +
bitsandbytes keep experts in full precision and cannot read these, so the folder is loraforge's own
(transformers refuses it, as it refuses int8).
"""


def register(p):
    from ..quant.functional import BLOCKSIZES, QUANT_TYPES

    p.add_argument("--out", metavar="DIR", required=True,
                   help="where to write the quantized model folder (a new or empty folder unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing model folder at --out (never the model being quantized)")
    p.add_argument("--quantize", default="nf4", choices=list(QUANT_TYPES),
                   help="nf4 = QLoRA's NormalFloat4; fp4 = 4-bit float; int8 = blockwise absmax int8 (loraforge only)")
    p.add_argument("--blocksize", type=int, default=64, choices=list(BLOCKSIZES), help="values per absmax scale")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="keep the per-block scales in float32 instead of 8-bit (QLoRA's double quantization)")
    add_model_args(p, quantize=False, computes=False)
    p.epilog = EPILOG


def run(args) -> int:
    from ..model.loading import DTYPES, read_config, resolve_source, weight_files
    from ..paths import check_output_dir
    from ..quant.checkpoint import QuantSpec
    from ..quant.export import write_quantized_model

    t0 = time.perf_counter()
    check_output_dir(args.out, overwrite=args.overwrite, inputs=[args.model] if args.model else [])
    spec = QuantSpec(args.quantize, args.blocksize, args.double_quant)
    dtype = DTYPES[args.dtype] if args.dtype not in (None, "auto") else None  # auto: keep the stored dtype
    before = sum(f.stat().st_size for f in weight_files(resolve_source(args.model).folder))
    out = write_quantized_model(args.model, args.out, spec, device=args.device, dtype=dtype,
                                overwrite=args.overwrite)
    after = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    log.info("wrote %s model to %s: weights %.1f MB -> %.1f MB (%.1fs); load it with --model %s",
             spec.quant_type, out, before / 1e6, after / 1e6, time.perf_counter() - t0, out)
    if read_config(Path(out)).num_experts:
        log.info("the MoE experts are quantized too (the routers are not): loraforge loads this folder, "
                 "transformers + bitsandbytes cannot (they have no quantized experts)")
    return 0
