"""A GGUF model file as a Hugging Face config and state dict, read as llama.cpp reads it.

transformers' GGUF loader drops what its per-family tables do not name: Llama's biases, a ``head_dim`` that
is not hidden / heads (Qwen3, Gemma 3), Gemma 2's soft-capping values and Gemma 3's sliding-layer pattern and
local rope base, llama3 rope factors. Each of those loads silently as another model. So the hyperparameters are
read here from llama.cpp's own keys, with llama.cpp's defaults where a key is absent, and every tensor is
accounted for: one the family has no place for (Phi-3's long-rope factors, say) is refused by name, as is a
tensor the family needs and the file lacks. The inverse of export/gguf_model.py: the same name tables, the
llama architecture's q/k rows back in Hugging Face's rope order, Gemma's norms back from llama.cpp's (1 + w),
expert tensors stacked as transformers keeps them. Tensors are dequantized with gguf's reference (numpy)
dequantizers; the tokenizer is left to transformers, which builds it from the file's vocabulary.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LoraForgeError
from ..export.gguf_names import GGUF_ARCH, expert_parts, name_map, rope_heads, tensor_name, unrope_rows
from .config import FAMILIES

# llama.cpp's architecture -> our model_type: the exporter's table read backwards ("llama" with experts is
# Mixtral, with a sliding window Mistral: see model_type_of).
GGUF_ARCHITECTURES = {arch: t for t, arch in GGUF_ARCH.items() if t not in ("mistral", "mixtral")}
# llama.cpp's sliding-window pattern when a file does not store one: Gemma 2 alternates (even layers local),
# Gemma 3 has five local layers to each global one.
_SWA_PERIOD = {"gemma2": 2, "gemma3": 6}
_MISSING = object()
# Part of the cache key of converted folders (model/embedded.py): bump it when a change here changes the output.
READER_VERSION = 2


class GGUFModel:
    """One open GGUF file: its metadata (``meta``) and tensors by name (``tensors``)."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            reader = GGUFReader(str(self.path))
            self.meta = {k: _value(f) for k, f in reader.fields.items()
                         if not k.startswith("tokenizer.ggml.") or k.endswith("_id")}
            self.tensors = {t.name: t for t in reader.tensors}
            self.arch = str(self.meta["general.architecture"])
        except Exception as e:  # noqa: BLE001 - gguf raises many types for a bad file
            raise LoraForgeError(f"{self.path}: cannot read this GGUF file ({type(e).__name__}: {e})") from None

    def get(self, key: str, default: Any = _MISSING) -> Any:
        """``{arch}.key`` from the header; without a default, a missing key is an error naming it."""
        full = f"{self.arch}.{key}"
        if full in self.meta:
            return self.meta[full]
        if default is _MISSING:
            raise LoraForgeError(f"{self.path}: the GGUF header has no {full!r}")
        return default

    def scalar(self, key: str, default: Any = _MISSING) -> Any:
        """A key llama.cpp allows per layer (an array) but our families keep one value for."""
        v = self.get(key, default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise LoraForgeError(f"{self.path}: {self.arch}.{key} differs between layers ({v}); loraforge's "
                                     "families use one value for every layer")
            v = v[0]
        return v

    def array(self, name: str) -> np.ndarray:
        """The tensor as fp32, in numpy order (rows first), dequantized if it is stored quantized."""
        from gguf.quants import dequantize

        t = self.tensors[name]
        try:
            a = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise LoraForgeError(f"{self.path}: tensor {name}: {e}") from None
        return np.array(a, dtype=np.float32).reshape([int(n) for n in reversed(t.shape)])


def _value(field) -> Any:
    v = field.contents()
    return v.decode() if isinstance(v, bytes) else v


def model_type_of(g: GGUFModel) -> str:
    """Our model_type for the file's architecture; an unsupported one is refused here, before anything else."""
    if g.arch not in GGUF_ARCHITECTURES:
        raise LoraForgeError(f"{g.path}: GGUF architecture {g.arch!r} is not supported; loraforge reads GGUF files "
                             f"of {', '.join(sorted(GGUF_ARCHITECTURES))}")
    if g.arch == "llama":  # llama.cpp writes Mistral and Mixtral as llama
        experts = int(g.get("expert_count", 0) or 0)
        window = g.get("attention.sliding_window", None)
        return "mixtral" if experts else ("mistral" if window else "llama")
    return GGUF_ARCHITECTURES[g.arch]


def hf_config(g: GGUFModel, model_type: str) -> dict[str, Any]:
    """The Hugging Face config.json of the model in `g`, from llama.cpp's hyperparameter keys."""
    hidden = int(g.get("embedding_length"))
    heads = int(g.scalar("attention.head_count"))
    n_layers = int(g.get("block_count"))
    head_dim = int(g.get("attention.key_length", hidden // heads))
    if int(g.get("attention.value_length", head_dim)) != head_dim:
        raise LoraForgeError(f"{g.path}: {g.arch}.attention.value_length differs from key_length; loraforge's "
                             "attention uses one head size")
    rot = int(g.get("rope.dimension_count", head_dim))
    if rot != head_dim:
        raise LoraForgeError(f"{g.path}: {g.arch}.rope.dimension_count = {rot} rotates part of each {head_dim}-wide "
                             "head (partial rotary); loraforge rotates the whole head")
    cfg: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": int(g.tensors["token_embd.weight"].shape[-1]) if "token_embd.weight" in g.tensors else
        int(g.get("vocab_size")),
        "hidden_size": hidden,
        "intermediate_size": int(g.scalar("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.scalar("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(g.get("attention.layer_norm_rms_epsilon")),
        "max_position_embeddings": int(g.get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    for key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                        ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in g.meta:
            cfg[hf_key] = int(g.meta[f"tokenizer.ggml.{key}"])
    theta = _f32(g.get("rope.freq_base", 10000.0))
    scaling = _rope_scaling(g, head_dim, theta)
    rope = {"rope_type": "default", "rope_theta": theta, **(scaling or {})}
    window = g.get("attention.sliding_window", None)
    if model_type in ("llama", "mistral", "mixtral"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    if model_type in ("mistral", "mixtral", "phi3"):
        cfg["sliding_window"] = int(window) if window else None
    if model_type in ("mixtral", "qwen3_moe"):
        key = "num_local_experts" if model_type == "mixtral" else "num_experts"
        cfg[key] = int(g.get("expert_count"))
        cfg["num_experts_per_tok"] = int(g.get("expert_used_count"))
    if model_type == "qwen3_moe":
        cfg["moe_intermediate_size"] = int(g.get("expert_feed_forward_length"))
        cfg["norm_topk_prob"] = True  # llama.cpp's qwen3moe always renormalises the top-k weights
        cfg["decoder_sparse_step"], cfg["mlp_only_layers"] = 1, []
    if model_type == "qwen2":
        cfg["use_sliding_window"] = False  # llama.cpp's qwen2 attends to the whole context
    if model_type == "olmo2" and window:
        raise LoraForgeError(f"{g.path}: olmo2.attention.sliding_window is set (OLMo 3's sliding layers); loraforge's "
                             "olmo2 attends to the whole context")
    if model_type in ("gemma2", "gemma3_text"):
        # llama.cpp scales q.k by 1/sqrt(head_dim), except on the 27B models (46 / 62 layers)
        big = (g.arch, n_layers) in (("gemma2", 46), ("gemma3", 62))
        cfg["query_pre_attn_scalar"] = hidden // heads if big else head_dim
        # llama.cpp's defaults: Gemma 2 slides over 4096 positions; a Gemma 3 file without a window has none
        swa = _swa_layers(g, n_layers) if window or g.arch == "gemma2" else [False] * n_layers
        cfg["sliding_window"] = int(window) if window else 4096
        cfg["layer_types"] = ["sliding_attention" if s else "full_attention" for s in swa]
    if model_type == "gemma2":
        cfg["attn_logit_softcapping"] = _f32(g.get("attn_logit_softcapping", 50.0))
        cfg["final_logit_softcapping"] = _f32(g.get("final_logit_softcapping", 30.0))
    if model_type == "gemma3_text":
        final = g.get("final_logit_softcapping", 0.0)
        cfg["attn_logit_softcapping"], cfg["final_logit_softcapping"] = None, _f32(final) if final else None
        local = {"rope_type": "default", "rope_theta": _f32(g.get("rope.freq_base_swa", 10000.0))}
        cfg["rope_parameters"] = {"full_attention": rope, "sliding_attention": local}
    else:
        cfg["rope_parameters"] = rope
    return cfg


def _f32(v) -> float:
    """A float the header stores as f32 (1e-05 reads as 9.99999974e-06) as the decimal it was written from."""
    return float(str(np.float32(v)))


def _swa_layers(g: GGUFModel, n_layers: int) -> list[bool]:
    pattern = g.get("attention.sliding_window_pattern", None)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise LoraForgeError(f"{g.path}: {g.arch}.attention.sliding_window_pattern has {len(pattern)} entries "
                                 f"for {n_layers} layers")
        return [bool(x) for x in pattern]
    period = int(pattern) if pattern else _SWA_PERIOD[g.arch]
    return [i % period < period - 1 for i in range(n_layers)]


def _rope_scaling(g: GGUFModel, head_dim: int, theta: float) -> dict[str, Any] | None:
    kind = g.get("rope.scaling.type", "none")
    if "rope_factors_long.weight" in g.tensors or "rope_factors_short.weight" in g.tensors:
        raise LoraForgeError(f"{g.path}: rope_factors_long / rope_factors_short (Phi-3's long-rope scaling) are not "
                             "supported by loraforge")
    if "rope_freqs.weight" in g.tensors:
        factors = g.array("rope_freqs.weight").reshape(-1).astype(np.float64)
        return llama3_rope_from_factors(factors, head_dim, theta, str(g.path))
    if kind in ("none", None):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(g.get("rope.scaling.factor"))}
    raise LoraForgeError(f"{g.path}: {g.arch}.rope.scaling.type {kind!r} is not read from GGUF by loraforge (linear "
                         "and llama3 are); load the model's Hugging Face folder instead")


def llama3_rope_factors(scaling: dict[str, Any], head_dim: int, theta: float) -> np.ndarray:
    """llama.cpp's ``rope_freqs`` for a llama3 rope scaling: each frequency is divided by its factor."""
    from .rope import llama3_inv_freq

    inv = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (inv / llama3_inv_freq(inv, scaling)).numpy()


def llama3_rope_from_factors(factors: np.ndarray, head_dim: int, theta: float, source: str) -> dict[str, Any]:
    """The llama3 rope scaling whose per-frequency factors are `factors` (llama.cpp's ``rope_freqs``).

    The factors fix the scaling only up to a common multiple of (original length, low, high), which gives the
    same rope; low_freq_factor = 1 picks one. With fewer than two frequencies in the smooth band, Llama 3's own
    ratio high / low = 4 is assumed. Whatever is found must reproduce `factors`, or the file is refused."""
    if factors.shape != (head_dim // 2,) or not np.isfinite(factors).all() or (factors <= 0).any():
        raise LoraForgeError(f"{source}: rope_freqs.weight should hold {head_dim // 2} positive factors")
    inv = theta ** -(np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv
    factor = float(factors.max())
    tol = 1e-4
    band = (factors > 1 + tol) & (factors < factor * (1 - tol))
    candidates = []
    if factor > 1 + tol:
        # smooth = (1/f - 1/factor) / (1 - 1/factor) = old/(hi-lo) * (1/wavelen) - lo/(hi-lo), linear in 1/wavelen
        s = (1 / factors - 1 / factor) / (1 - 1 / factor)
        if band.sum() >= 2:
            a, b = np.polyfit(1 / wavelen[band], s[band], 1)
            if b < 0:
                hi = 1 - 1 / b
                candidates.append((a * (hi - 1), 1.0, hi))
        elif band.sum() == 1:  # assume hi = 4 * lo
            w, sv = wavelen[band][0], s[band][0]
            candidates.append((w * (3 * sv + 1), 1.0, 4.0))
        else:  # no frequency in between: any boundary between the last unscaled and first scaled one
            top = wavelen[factors <= 1 + tol].max(initial=0.0)
            low = wavelen[factors >= factor * (1 - tol)].min(initial=np.inf)
            if top * 4 < low:
                candidates.append((math.sqrt(top * 4 * low) if top > 0 else low / 2, 1.0, 4.0))
    for old, lo, hi in candidates:
        scaling = {"rope_type": "llama3", "factor": float(f"{factor:.6g}"), "low_freq_factor": lo,
                   "high_freq_factor": float(f"{hi:.6g}"),  # the file's factors are f32: the fit is not exact
                   "original_max_position_embeddings": int(round(old))}
        if np.allclose(llama3_rope_factors(scaling, head_dim, theta), factors, rtol=1e-4, atol=0):
            return scaling
    raise LoraForgeError(f"{source}: rope_freqs.weight holds per-frequency rope factors that are no llama3 rope "
                         "scaling; loraforge cannot load them")


def hf_state_dict(g: GGUFModel, cfg: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Every tensor of the Hugging Face model `cfg` describes, from `g`, in transformers' names and layouts.

    A tensor the model needs and the file lacks, of the wrong shape, or in the file with no place in the
    model is an error naming it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    keep = {k: v for k, v in cfg.items() if k != "model_type"}
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg["model_type"], **keep))
    expected = meta.state_dict()
    if cfg.get("tie_word_embeddings"):
        expected.pop("lm_head.weight", None)
    model_type = cfg["model_type"]
    names = name_map(model_type, cfg["num_hidden_layers"])
    hp = meta.config
    used = {"rope_freqs.weight"}
    out: dict[str, torch.Tensor] = {}
    for key, want in expected.items():
        parts = expert_parts(key)
        arrays = []
        for part in parts:
            name = tensor_name(names, part)
            if name not in g.tensors:
                raise LoraForgeError(f"{g.path}: no tensor {name!r}, which a {model_type} model of this config needs "
                                     f"(for {key})")
            used.add(name)
            arrays.append(torch.from_numpy(g.array(name)))
        t = arrays[0] if len(arrays) == 1 else torch.cat(arrays, dim=1)  # experts: gate rows, then up rows
        if tuple(t.shape) != tuple(want.shape):
            raise LoraForgeError(f"{g.path}: tensor {tensor_name(names, parts[0])} has shape {list(t.shape)}, but "
                                 f"{key} of this config is {list(want.shape)}")
        heads = rope_heads(model_type, hp, key)
        if heads is not None:
            t = unrope_rows(t, heads)
        if FAMILIES[model_type].get("norm_unit_offset") and key.endswith("norm.weight"):
            t = t - 1.0  # llama.cpp multiplies by the stored weight; Gemma's modules by (1 + w)
        out[key] = t.contiguous()
    extra = sorted(set(g.tensors) - used)
    if extra:
        shown = ", ".join(extra[:4]) + (f" and {len(extra) - 4} more" if len(extra) > 4 else "")
        raise LoraForgeError(f"{g.path}: tensors {shown} have no place in a {model_type} model; loraforge cannot "
                             "load this file without dropping them")
    return out


def read_gguf(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, state dict) of the GGUF model file at `path`."""
    g = GGUFModel(path)
    model_type = model_type_of(g)
    cfg = hf_config(g, model_type)
    return cfg, hf_state_dict(g, cfg)
