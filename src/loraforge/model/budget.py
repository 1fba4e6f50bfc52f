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


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(parameters in the decoder layers' linear weights, every other parameter), as stored.

    A tied output head shares the embedding's tensor and counts once, as `count_parameters` counts it.
    """
    H, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers  # F: the MLP width
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    linear = H * q + 2 * H * kv + q * H + 3 * H * F  # q, k, v, o; gate, up, down
    biases = (q + 2 * kv) * cfg.qkv_bias + H * cfg.o_bias + (2 * F + H) * cfg.mlp_bias
    embeddings = cfg.vocab_size * H * (1 if cfg.tie_word_embeddings else 2)
    return L * linear, L * (biases + 2 * H) + H + embeddings  # + two norms per layer, the final norm


def weight_bytes(cfg: ModelConfig, dtype: torch.dtype, quant_type: str | None = None) -> int:
    linear, other = parameter_counts(cfg)
    size = torch.empty(0, dtype=dtype).element_size()
    linear_bytes = linear * size
    if quant_type:
        linear_bytes = linear * QUANT_BITS.get(quant_type, 8 * size) / 8 + 7 * cfg.num_hidden_layers * QUANT_TABLES  # 7 linears
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
