"""ModelConfig: the few numbers our Llama-family implementation needs, read from a Hugging Face config.

We keep the original config dict alongside (``hf_config``) so a merged model can be written back as a
folder that plain transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraForgeError

# Architectures whose checkpoints map 1:1 onto our implementation (same module names, same maths).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = cfg.get("architectures") or [model_type]
            raise LoraForgeError(
                f"{source}: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                f"loraforge supports Llama-family models: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(cfg["hidden_size"])
            heads = int(cfg["num_attention_heads"])
            # transformers 5 moved rope settings into `rope_parameters`; older configs have them at the top.
            rope = dict(cfg.get("rope_parameters") or {})
            rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            scaling = cfg.get("rope_scaling") or rope or None
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type", scaling.get("type", "default"))
                if kind not in ("default", "linear", "llama3"):
                    raise LoraForgeError(f"{source}: unsupported rope scaling {kind!r}; use default, linear or llama3")
                scaling["rope_type"] = kind
                if kind == "default":
                    scaling = None
            eos = cfg.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list) else [int(eos)])
            attention_bias = bool(cfg.get("attention_bias", False))
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
                rope_theta=rope_theta,
                rope_scaling=scaling,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Qwen2 always has q/k/v biases and no o_proj bias; Llama's attention_bias covers all four.
                qkv_bias=True if model_type == "qwen2" else attention_bias,
                o_bias=False if model_type == "qwen2" else attention_bias,
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                model_type=model_type,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos_ids,
                pad_token_id=cfg.get("pad_token_id"),
                hf_config=dict(cfg),
            )
        except KeyError as e:
            raise LoraForgeError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise LoraForgeError(f"{source}: malformed field ({e})") from None
