"""Our families as llama.cpp sees them: the GGUF architecture, tensor names, and the q/k row order.

Tensor names come from the `gguf` package's own tables (TensorNameMap), the ones llama.cpp's converters use,
so a Hugging Face module path such as ``model.layers.3.self_attn.q_proj`` becomes ``blk.3.attn_q``.
"""

from __future__ import annotations

import torch

from ..errors import LoraForgeError

# our model_type -> llama.cpp's architecture. llama.cpp runs Mistral and Mixtral as "llama" (Mixtral with
# expert tensors), as its own converter writes them.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
             "qwen3_moe": "qwen3moe", "gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3",
             "phi3": "phi3", "olmo2": "olmo2"}

# Architectures whose llama.cpp rope rotates adjacent pairs (x[2i], x[2i+1]) where Hugging Face rotates
# halves (x[i], x[i + d/2]): their q and k rows are reordered per head (see rope_rows).
PAIRED_ROPE = {"llama"}


def gguf_arch(model_type: str) -> str:
    if model_type not in GGUF_ARCH:
        raise LoraForgeError(f"model_type {model_type!r}: no llama.cpp architecture known for it; GGUF export "
                             f"covers {', '.join(sorted(GGUF_ARCH))}")
    return GGUF_ARCH[model_type]


def name_map(model_type: str, n_layers: int):
    import gguf

    arch = gguf_arch(model_type)
    key = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    return gguf.get_tensor_name_map(key, n_layers)


def tensor_name(names, hf_name: str) -> str:
    """``model.layers.0.self_attn.q_proj.weight`` -> ``blk.0.attn_q.weight`` (bias likewise)."""
    out = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if out is None:
        raise LoraForgeError(f"{hf_name}: llama.cpp has no tensor for this weight; it cannot be exported to GGUF")
    return out


def expert_parts(key: str) -> list[str]:
    """The per-kind names llama.cpp's tables know a stacked MoE tensor by: ``...mlp.experts.gate_up_proj`` [E, 2I, H]
    is two, ``...gate_proj.weight`` (its first I rows per expert) and ``...up_proj.weight``; ``down_proj`` is one;
    any other key is itself."""
    base = key.removesuffix(".weight")
    if base.endswith(".mlp.experts.gate_up_proj"):
        stem = base.removesuffix("gate_up_proj")
        return [f"{stem}gate_proj.weight", f"{stem}up_proj.weight"]
    if base.endswith(".mlp.experts.down_proj"):
        return [f"{base}.weight"]
    return [key]


def rope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (weight [H*D, in], bias [H*D], or LoRA B [H*D, r]) from
    Hugging Face's half-split rope layout to llama.cpp's interleaved one: within each head, new row 2i is
    old row i and new row 2i+1 is old row i + D/2."""
    d = w.shape[0] // n_heads
    # [H, 2, D/2, ...] -> [H, D/2, 2, ...]: the two halves of each head interleaved
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def unrope_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of rope_rows (llama.cpp's row order back to Hugging Face's)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_heads(model_type: str, cfg, hf_name: str) -> int | None:
    """How many heads to reorder `hf_name`'s rows over, or None when it keeps its row order."""
    if gguf_arch(model_type) not in PAIRED_ROPE:
        return None
    if ".self_attn.q_proj." in hf_name + ".":
        return cfg.num_attention_heads
    if ".self_attn.k_proj." in hf_name + ".":
        return cfg.num_key_value_heads
    return None
