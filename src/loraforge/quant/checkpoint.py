"""Quantized model checkpoints: how a model folder says it is quantized, and which weights are.

A pre-quantized folder is laid out the way transformers + bitsandbytes save a 4-bit model, so either
library reads the other's:

    config.json         the model config plus a `quantization_config` (see `quantization_config`)
    model.safetensors   each quantized linear weight as the tensors of serialize.py (`X.weight`,
                        `X.weight.absmax`, ..., `X.weight.quant_state.bitsandbytes__nf4`); every other
                        tensor (embeddings, norms, lm_head, biases) unquantized, as in the source

Each quantized weight describes itself (type, block size, shape, double quantization) in its
quant_state JSON, so the loader trusts the tensors and uses `quantization_config` only to check that
the folder is something it can read. INT8 is our own format: transformers cannot load it.
"""

import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from loraforge.errors import LoraForgeError
from loraforge.quant.functional import QuantState, check_config, quantize
from loraforge.quant.linear import QuantLinear


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How weights are quantized. The defaults are QLoRA's: NF4, blocks of 64, double quantization."""

    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True

    def __post_init__(self):
        check_config(self.quant_type, self.blocksize)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec) -> QuantState:
    return quantize(weight, spec.quant_type, spec.blocksize, spec.double_quant)


def use_quant_linears(
    model: nn.Module, names: Iterable[str], spec: QuantSpec, compute_dtype: torch.dtype
) -> None:
    """Replace the named linears of a model built on the meta device by QuantLinear placeholders.

    The placeholders hold no data; the loader fills each one (`set_quant_state`) from the checkpoint.
    Replacing the modules before reading anything means a bias, which may be read before or after
    its weight, always lands on the module that keeps it.
    """
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, leaf)
        layer = QuantLinear(
            old.in_features,
            old.out_features,
            bias=old.bias is not None,
            quant_type=spec.quant_type,
            blocksize=spec.blocksize,
            double_quant=spec.double_quant,
            compute_dtype=compute_dtype,
            dtype=compute_dtype,
            device="meta",
        )
        setattr(parent, leaf, layer)


def stored_quantized(keys: Iterable[str]) -> dict[str, str]:
    """{weight name: quant type} for each weight a checkpoint stores quantized, from its tensor names.

    A quantized weight `X.weight` is recognised by its `X.weight.quant_state.<namespace>__<type>` key;
    reading the tensors themselves (and checking them) is left to `state_from_tensors`.
    """
    out = {}
    for key in keys:
        name, sep, kind = key.rpartition(".quant_state.")
        if sep:
            out[name] = kind.rpartition("__")[2]
    return out


def group_of(key: str, stored: dict[str, str]) -> str | None:
    """The stored quantized weight that tensor `key` belongs to (`X.weight` for `X.weight.absmax`)."""
    parts = key.split(".")
    for i in range(len(parts), 0, -1):
        name = ".".join(parts[:i])
        if name in stored:
            return name
    return None


# -- quantization_config in config.json ----------------------------------------------------------


def quantization_config(spec: QuantSpec, compute_dtype: torch.dtype, own: bool = False) -> dict:
    """The `quantization_config` entry of config.json for a folder quantized with `spec`.

    For NF4/FP4 it is what transformers writes for `BitsAndBytesConfig(load_in_4bit=True, ...)`, so
    `AutoModelForCausalLM.from_pretrained` loads the folder with bitsandbytes. The block size is not
    part of it: bitsandbytes reads it from each weight's quant_state JSON, as we do. INT8, and `own`
    folders (MoE experts stored quantized, which transformers reads as missing weights), name loraforge
    as the method: transformers then refuses the folder instead of loading it wrongly.
    """
    dtype_name = str(compute_dtype).removeprefix("torch.")
    if spec.quant_type == "int8" or own:
        return {
            "quant_method": "loraforge",
            "quant_type": spec.quant_type,
            "blocksize": spec.blocksize,
            "double_quant": spec.double_quant,
            "compute_dtype": dtype_name,
        }
    return {
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": dtype_name,
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": spec.quant_type,
        "bnb_4bit_use_double_quant": spec.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": True,
        "load_in_8bit": False,
        "quant_method": "bitsandbytes",
    }


def spec_from_config(hf_config: dict, where: str) -> QuantSpec | None:
    """The QuantSpec a config.json declares, None if it declares none; refuses what we cannot read."""
    qc = hf_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, dict):
        raise LoraForgeError(f"{where}: quantization_config is not a JSON object")
    method = qc.get("quant_method")
    try:
        if method == "loraforge":
            blocksize = qc.get("blocksize", 64)
            if isinstance(blocksize, bool) or not isinstance(blocksize, int):  # int(1e999) would overflow
                raise LoraForgeError(f"blocksize must be an integer, got {blocksize!r}")
            return QuantSpec(qc.get("quant_type"), blocksize, bool(qc.get("double_quant")))
        if method == "bitsandbytes":
            if qc.get("load_in_8bit") or qc.get("_load_in_8bit"):
                raise LoraForgeError(
                    f"{where}: a bitsandbytes 8-bit (LLM.int8) checkpoint; loraforge reads bitsandbytes 4-bit "
                    "only. Load the full-precision model with --quantize int8 instead"
                )
            if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
                # bitsandbytes' own defaults when the keys are absent: fp4, no double quantization
                quant_type = qc.get("bnb_4bit_quant_type", "fp4")
                return QuantSpec(quant_type, 64, bool(qc.get("bnb_4bit_use_double_quant", False)))
            raise LoraForgeError(
                f"{where}: quantization_config says bitsandbytes but neither 4-bit nor 8-bit"
            )
    except LoraForgeError as e:
        if str(e).startswith(where):
            raise
        raise LoraForgeError(f"{where}: quantization_config: {e}") from None
    raise LoraForgeError(
        f"{where}: quantization_config.quant_method {method!r} is not supported (loraforge reads bitsandbytes "
        "4-bit and its own int8); load the full-precision model, optionally with --quantize"
    )


__all__ = [
    "QuantSpec",
    "group_of",
    "quantization_config",
    "quantize_weight",
    "spec_from_config",
    "stored_quantized",
    "use_quant_linears",
]
