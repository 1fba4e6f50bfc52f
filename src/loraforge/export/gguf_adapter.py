"""A LoRA adapter as llama.cpp's adapter GGUF (what `llama-cli --lora`, llama-cpp-python's `lora_path` and
Ollama's ADAPTER read).

The file holds ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha`` and, per
adapted projection, ``blk.N.<tensor>.weight.lora_a`` (A, [r, in]) and ``.lora_b`` (B, [out, r]), named
and laid out as the base model's GGUF tensor is. llama.cpp scales every update by alpha / r, r read from
each B; our scale can differ from that:

- rsLoRA scales by alpha / sqrt(r): we write alpha' = alpha * sqrt(r), so that alpha' / r = alpha / sqrt(r);
- rank_pattern / alpha_pattern give modules their own scale: where it differs from alpha' / r_module, the
  ratio is folded into that module's B (exact, since the update is linear in B).

On llama-architecture models llama.cpp's q and k rows are in its rope order (gguf_names.rope_rows), so
B's rows are reordered the same way; A, which acts on the input side, is unchanged.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from ..lora.layer import LoraLinear
from ..lora.model import registry
from ..paths import atomic_file
from .gguf_names import gguf_arch, name_map, rope_heads, rope_rows, tensor_name

log = logging.getLogger("loraforge")


@torch.no_grad()
def adapter_tensors(model: nn.Module, adapter: str) -> tuple[float, dict[str, torch.Tensor]]:
    """(alpha as llama.cpp reads it, {GGUF name: fp32 tensor}) for adapter `adapter` on `model`."""
    cfg = model.config
    lcfg = registry(model).configs[adapter]
    # the alpha whose alpha / r gives the config's own scale at the config's rank
    alpha = lcfg.scaling(lcfg.r, float(lcfg.alpha)) * lcfg.r
    names = name_map(cfg.model_type, cfg.num_hidden_layers)
    out: dict[str, torch.Tensor] = {}
    folded = []
    for path, m in model.named_modules():
        if not isinstance(m, LoraLinear) or adapter not in m.lora_A:
            continue
        if path.endswith("lm_head") and cfg.tie_word_embeddings:
            raise LoraForgeError(f"{path}: the adapter trains the output head, which this model ties to the token "
                                 "embedding; llama.cpp has no separate output tensor to apply it to")
        name = tensor_name(names, f"{path}.weight")
        A = m.lora_A[adapter].detach().float().cpu()  # [r, in]
        B = m.lora_B[adapter].detach().float().cpu()  # [out, r]
        r = A.shape[0]
        ratio = float(m.scaling[adapter]) / (alpha / r)
        if not math.isclose(ratio, 1.0, rel_tol=1e-6):
            B = B * ratio
            folded.append(path)
        heads = rope_heads(cfg.model_type, cfg, path)
        if heads is not None:
            B = rope_rows(B, heads)
        out[f"{name}.lora_a"] = A.contiguous()
        out[f"{name}.lora_b"] = B.contiguous()
    if not out:
        raise LoraForgeError(f"adapter {adapter!r} has no LoRA weights to export")
    if folded:
        log.info("%d module(s) have their own rank/alpha scale; it is folded into their lora_b (e.g. %s)",
                 len(folded), folded[0])
    return alpha, out


def write_adapter_gguf(model: nn.Module, adapter: str, out: str | Path, *, base_name: str = "") -> Path:
    """Write adapter `adapter` (attached to `model`) as a llama.cpp LoRA GGUF at `out`, atomically."""
    import gguf

    arch = gguf_arch(model.config.model_type)
    alpha, tensors = adapter_tensors(model, adapter)  # everything refused before a file is opened
    out = Path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        w.add_name(adapter)
        if base_name:
            w.add_base_model_count(1)
            w.add_base_model_name(0, base_name)
        for name, t in tensors.items():
            w.add_tensor(name, t.numpy())
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
