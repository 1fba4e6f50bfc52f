"""A model (base + s*BA merged, or the plain base) as a GGUF model file that llama.cpp and Ollama load.

The weights are lora.merge_export.merged_state_dict's (an NF4 base dequantized first), renamed with gguf's
tables and put in llama.cpp's layouts:
- llama architecture (Llama, Mistral, Mixtral): q and k rows in llama.cpp's rope order (gguf_names.rope_rows);
- Gemma: norm weights stored as 1 + w, since llama.cpp's RMSNorm multiplies by w itself;
- MoE: the stacked experts [E, 2I, H] split into ffn_gate_exps / ffn_up_exps [E, I, H];
- llama3 rope scaling: the per-frequency factors as ``rope_freqs``, as llama.cpp's converter writes them.
model/gguf_read.py reads all of this back. Hyperparameters llama.cpp cannot express (yarn rope scaling, a non-default attention scale, MoE
models with dense layers) are refused by name before a file is opened.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LoraForgeError
from ..lora.merge_export import merged_state_dict
from ..model.gguf_read import llama3_rope_factors
from ..paths import atomic_file
from .gguf_names import expert_parts, gguf_arch, name_map, rope_heads, rope_rows, tensor_name
from .gguf_vocab import add_tokenizer

log = logging.getLogger("loraforge")

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


def check_exportable(cfg) -> None:
    """Refuse, by field, what llama.cpp's implementation of this family cannot express."""
    arch = gguf_arch(cfg.model_type)
    where = f"config.json ({cfg.model_type})"
    kind = None if cfg.rope_scaling is None else cfg.rope_scaling.get("rope_type")
    if kind not in (None, "linear") and not (kind == "llama3" and arch == "llama"):
        raise LoraForgeError(f"{where}: rope_scaling {kind!r} is not written to GGUF by loraforge (linear is, and "
                             "llama3 on the llama architecture)")
    if cfg.attn_scale is not None and abs(cfg.attn_scale / _llama_cpp_attn_scale(arch, cfg) - 1) > 1e-6:
        raise LoraForgeError(f"{where}: query_pre_attn_scalar sets an attention scale that llama.cpp does not "
                             "read from a GGUF file (it uses 1/sqrt(head_dim))")
    if (cfg.attn_softcap or cfg.final_softcap) and arch != "gemma2":
        raise LoraForgeError(f"{where}: logit soft-capping is only read by llama.cpp for gemma2")
    if arch in ("gemma", "gemma2") and not cfg.tie_word_embeddings:
        raise LoraForgeError(f"{where}: tie_word_embeddings is false, but llama.cpp's {arch} always uses the token "
                             "embedding as the output head")
    if cfg.num_experts and not cfg.moe_renormalize:
        raise LoraForgeError(f"{where}: norm_topk_prob is false, but llama.cpp's {arch} always renormalises the "
                             "top-k expert weights")
    if cfg.num_experts and cfg.dense_layers:
        raise LoraForgeError(f"{where}: mlp_only_layers / decoder_sparse_step (dense layers in an MoE model) are "
                             "not expressible in llama.cpp's GGUF")


def _llama_cpp_attn_scale(arch: str, cfg) -> float:
    """The softmax scale llama.cpp uses: 1/sqrt(head_dim), except for the 27B Gemma 2 / 3 (told apart by their
    layer count), where it is 1/sqrt(hidden / heads) as their query_pre_attn_scalar says."""
    if (arch, cfg.num_hidden_layers) in (("gemma2", 46), ("gemma3", 62)):
        return (cfg.hidden_size // cfg.num_attention_heads) ** -0.5
    return cfg.head_dim ** -0.5


@torch.no_grad()
def gguf_tensors(model: nn.Module, adapter: str | None) -> tuple[dict[str, torch.Tensor], bool]:
    """({GGUF name: fp32 tensor}, base was quantized) for the model with `adapter` merged (None: the base)."""
    cfg = model.config
    check_exportable(cfg)
    names = name_map(cfg.model_type, cfg.num_hidden_layers)
    hf, quantized = merged_state_dict(model, adapter)
    out: dict[str, torch.Tensor] = {}
    for key, t in hf.items():
        t = t.float()
        for part_key, part in _split_experts(key, t):
            if cfg.norm_unit_offset and part_key.endswith("norm.weight"):
                part = part + 1.0  # Gemma's (1 + w): llama.cpp multiplies by the stored weight
            heads = rope_heads(cfg.model_type, cfg, part_key)
            if heads is not None:
                part = rope_rows(part, heads)
            out[tensor_name(names, part_key)] = part.contiguous()
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "llama3":
        # llama.cpp divides each rope frequency by its factor from this tensor, as its own converter writes it
        factors = llama3_rope_factors(cfg.rope_scaling, cfg.head_dim, cfg.rope_theta)
        out["rope_freqs.weight"] = torch.from_numpy(factors.astype(np.float32))
    return out, quantized


def _split_experts(key: str, t: torch.Tensor):
    """Our stacked MoE tensors under the per-kind names llama.cpp's tables know; other tensors as they are."""
    parts = expert_parts(key)
    if len(parts) == 2:  # [E, 2I, H]: gate rows, then up rows
        return list(zip(parts, t.chunk(2, dim=1), strict=True))
    return [(parts[0], t)]


def _encode(t: torch.Tensor, outtype: str):
    """(array, GGML type) for one tensor: 1-D tensors (norms, biases) stay f32, as llama.cpp expects."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    a = t.numpy().astype(np.float32)
    if a.ndim == 1 or outtype == "f32":
        return a, Q.F32
    if outtype == "f16":
        return a.astype(np.float16), Q.F16
    if outtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] != 0:
        return a.astype(np.float16), Q.F16  # rows that are not whole Q8_0 blocks
    q = {"bf16": Q.BF16, "q8_0": Q.Q8_0}[outtype]
    return gguf.quants.quantize(a, q), q


_FILE_TYPE = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}


def _hparams(w, cfg) -> None:
    import gguf

    arch = gguf_arch(cfg.model_type)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_vocab_size(cfg.vocab_size)
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "linear":  # llama3: rope_freqs
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(cfg.rope_scaling["factor"]))
    windows = [x for x in cfg.layer_windows if x is not None]
    if windows:
        w.add_sliding_window(max(windows))
        if arch in ("gemma2", "gemma3"):
            w.add_sliding_window_pattern([x is not None for x in cfg.layer_windows])
        else:  # phi3: llama.cpp reads the window but has switched Phi's off (llama.cpp PR 13676)
            log.warning("llama.cpp's %s ignores the sliding window (%d): it attends to the whole context",
                        arch, max(windows))
    if cfg.rope_local is not None:
        w.add_rope_freq_base_swa(cfg.rope_local.theta)
    if arch == "gemma2":
        if cfg.attn_softcap:
            w.add_attn_logit_softcapping(cfg.attn_softcap)
        if cfg.final_softcap:
            w.add_final_logit_softcapping(cfg.final_softcap)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.experts_per_token)
        if arch == "qwen3moe":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)


def write_model_gguf(model: nn.Module, out: str | Path, adapter: str | None = None, *, outtype: str = "f16",
                     name: str = "") -> Path:
    """Write `model` with `adapter` merged (None: the plain base) as a GGUF model file at `out`, atomically."""
    import gguf

    if outtype not in OUTTYPES:
        raise LoraForgeError(f"--outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    cfg = model.config
    arch = gguf_arch(cfg.model_type)
    tensors, quantized = gguf_tensors(model, adapter)
    if quantized:
        log.warning("the base was quantized: the adapter is merged onto the dequantized base weights, written "
                    "as %s", outtype)
    out = Path(out)
    with atomic_file(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name or getattr(model, "name_or_path", "") or out.stem)
        w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPE[outtype]))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _hparams(w, cfg)
        add_tokenizer(w, getattr(model, "source_folder", None), cfg.vocab_size)
        for key, t in tensors.items():
            data, qtype = _encode(t, outtype)
            w.add_tensor(key, data, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return out
