"""Will this model fit? Its weight bytes, from config.json alone, against the memory the device has free.

Building a model of `num_hidden_layers = 10**7` took minutes before failing with bad_alloc, so the
loader asks this first, before a single module exists. The estimate is the weights only (parameters x
bytes per element, quantized linears at their bits per weight); the KV cache and activations come on
top, so a model that passes may still be tight, but one that fails cannot load.
"""

from __future__ import annotations

import os

import torch

from ..errors import LoraForgeError
from .config import ModelConfig

# Bits per weight of a quantized linear, codes plus block scales (blocks of 64, as loraforge and QLoRA
# quantize): fp32 scales add 0.5 bit; double quantization brings them to ~0.13, so these are upper bounds.
QUANT_BITS = {"nf4": 4.5, "fp4": 4.5, "int8": 8.5}
QUANT_TABLES = 2048  # bytes per quantized linear of fixed size: its code table and the scales' code table
SKIP_ENV = "LORAFORGE_SKIP_MEMORY_CHECK"


def parameter_counts(cfg: ModelConfig) -> tuple[int, int, int]:
    """(parameters in the weights QLoRA quantizes, every other parameter, how many weights those are), as
    stored: counted on the family's modules built on the meta device (no memory), one layer of each kind
    (dense, MoE) times how many there are, so every family's layout (fused projections, extra norms, MoE
    experts and routers) is exact.

    A tied output head shares the embedding's tensor and counts once, as `count_parameters` counts it.
    """
    from dataclasses import replace

    from torch import nn

    from .decoder import CausalLM, DecoderLayer

    def counts(module: nn.Module, skip: str = "") -> tuple[int, int, int]:
        quantized = [m.weight.numel() for name, m in module.named_modules() if isinstance(m, nn.Linear) and name != skip]
        for name, p in module.named_parameters():  # each expert's projection is quantized as its own weight
            if "experts." in name:
                quantized += [p[0].numel()] * p.shape[0]
        total = sum(p.numel() for p in module.parameters())  # parameters() yields a tied tensor once
        return sum(quantized), total - sum(quantized), len(quantized)

    L = cfg.num_hidden_layers
    dense = [i for i in sorted(set(cfg.dense_layers)) if i < L] if cfg.num_experts else list(range(min(L, 1)))
    n_dense = len(dense) if cfg.num_experts else L
    first_moe = next((i for i in range(len(dense) + 1) if i not in dense), None) if cfg.num_experts else None
    with torch.device("meta"):
        out = counts(CausalLM(replace(cfg, num_hidden_layers=0, layer_windows=[])), skip="lm_head")
        for i, n in ((dense[0] if dense else None, n_dense), (first_moe, L - n_dense)):
            if i is not None and n:
                out = tuple(a + n * b for a, b in zip(out, counts(DecoderLayer(cfg, i)), strict=True))
    return out


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, quant_type: str | None = None) -> int:
    linear, other, n_linear = parameter_counts(cfg)
    size = torch.empty(0, dtype=dtype).element_size()
    linear_bytes = linear * size
    if quant_type:
        linear_bytes = linear * QUANT_BITS.get(quant_type, 8 * size) / 8 + n_linear * QUANT_TABLES
    return int(linear_bytes + other * size)


def check_fits(cfg: ModelConfig, dtype: torch.dtype, quant_type: str | None, device: torch.device,
               where: str) -> None:
    """Refuse a model whose weights alone need more than `device` has free (LORAFORGE_SKIP_MEMORY_CHECK=1
    skips this, e.g. for a model that pages in from its memory-mapped files on a small machine)."""
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim"):
        if getattr(cfg, field) < 1:
            raise LoraForgeError(f"{where}: {field} must be a positive integer, got {getattr(cfg, field)}")
    if os.environ.get(SKIP_ENV) == "1":
        return
    need = weight_bytes(cfg, dtype, quant_type)
    free = free_bytes(device)
    if free is not None and need > free:
        how = f"{quant_type}-quantized" if quant_type else str(dtype).removeprefix("torch.")
        raise LoraForgeError(
            f"{where}: this model needs about {gib(need)} for its weights alone ({how}, "
            f"{cfg.num_hidden_layers} layers of hidden size {cfg.hidden_size}), but {device} has {gib(free)} free; "
            f"check the config, or set {SKIP_ENV}=1 to try anyway"
        )


def free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        from ..procstat import available_memory

        return available_memory()
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n < 2**50 else f"{n / 2**50:,.1f} PiB"
