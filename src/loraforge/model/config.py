"""ModelConfig: one typed description of every decoder family we run, read from a Hugging Face config.json.

A family is configuration, not code (litgpt's ``Config`` is the model): where Gemma 2 differs from Llama
it is in fields (``norm_placement="sandwich"``, ``attn_softcap=50.0``, ``layer_windows``...), and the one
decoder in ``model/decoder.py`` reads them. ``FAMILIES`` holds what is fixed per family; everything a
checkpoint may vary is read from its config.json.

config.json is first normalised by transformers' own config class for the family, so a default that
config.json leaves out (Gemma 2's ``query_pre_attn_scalar``, Qwen2's ``layer_types``) is the one
transformers uses. A field that changes the maths and that we do not implement is refused, by name
(``unsupported``): never silently ignored. We keep the original dict (``hf_config``) so a merged model
can be written back as a folder that plain transformers loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import LoraForgeError

# What is fixed per family. Keys: the module layout (norm placement, q/k norms, fused projections, MoE),
# and the few numbers a family hard-codes rather than reads from config.json.
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {"arch": "LlamaForCausalLM"},
    "mistral": {"arch": "MistralForCausalLM"},
    "mixtral": {"arch": "MixtralForCausalLM", "moe": "mixtral"},
    "qwen2": {"arch": "Qwen2ForCausalLM", "qkv_bias": True, "o_bias": False},
    "qwen3": {"arch": "Qwen3ForCausalLM", "qk_norm": "head"},
    "qwen3_moe": {"arch": "Qwen3MoeForCausalLM", "qk_norm": "head", "moe": "qwen3_moe"},
    "gemma": {"arch": "GemmaForCausalLM", "norm_unit_offset": True, "embed_scale": True},
    "gemma2": {"arch": "Gemma2ForCausalLM", "norm_unit_offset": True, "embed_scale": True,
               "norm_placement": "sandwich"},
    "gemma3_text": {"arch": "Gemma3ForCausalLM", "norm_unit_offset": True, "embed_scale": True,
                    "norm_placement": "sandwich", "qk_norm": "head"},
    "phi3": {"arch": "Phi3ForCausalLM", "fused_qkv": True, "fused_gate_up": True},
    "olmo2": {"arch": "Olmo2ForCausalLM", "norm_placement": "post", "qk_norm": "proj"},
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
ARCHITECTURES = {k: v["arch"] for k, v in FAMILIES.items()}

ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# hidden_act -> our MLP kind. Gemma's "gelu_pytorch_tanh" is GeGLU with the tanh approximation.
MLP_KINDS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh", "gelu_tanh": "geglu_tanh"}
NORM_PLACEMENTS = ("pre", "sandwich", "post")
QK_NORMS = (None, "head", "proj")


@dataclass
class RopeConfig:
    """Rotary embedding of one kind of layer: base theta and a scaling (transformers' rope_parameters)."""

    theta: float = 10000.0
    scaling: dict[str, Any] | None = None  # None = default; else {"rope_type": "linear" | "llama3" | "yarn", ...}

    def __post_init__(self):
        if self.scaling is not None and self.scaling.get("rope_type") not in ROPE_TYPES[1:]:
            raise LoraForgeError(f"rope_scaling: unsupported rope_type {self.scaling.get('rope_type')!r}; "
                                 f"loraforge implements {', '.join(ROPE_TYPES)}")


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
    # Sliding layers' own rotary embedding (Gemma 3's local layers); None = the same as the others.
    rope_local: RopeConfig | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # "pre": norm before attention and MLP (Llama). "sandwich": also a norm on each block's output before
    # the residual add (Gemma 2/3). "post": only the output norms (OLMo 2).
    norm_placement: str = "pre"
    norm_unit_offset: bool = False  # Gemma: the norm scales by (1 + w), its weights stored around 0
    qk_norm: str | None = None  # "head": RMSNorm over each head's D (Qwen3, Gemma 3); "proj": over H*D (OLMo 2)
    # Keys a query sees per layer: None = all before it, W = its own and the W - 1 before it.
    layer_windows: list[int | None] = field(default_factory=list)
    attn_scale: float | None = None  # softmax scale of q.k; None = 1/sqrt(head_dim)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the output logits
    embed_scale: bool = False  # embeddings times sqrt(hidden_size) (Gemma)
    mlp_kind: str = "swiglu"  # or "geglu_tanh"
    fused_qkv: bool = False  # Phi-3's qkv_proj
    fused_gate_up: bool = False  # Phi-3's gate_up_proj
    # Mixture of experts (0 experts = dense): softmax router over num_experts, top-k, the k weights
    # renormalised to sum to one when moe_renormalize (Mixtral always, Qwen3-MoE's norm_topk_prob).
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    moe_renormalize: bool = True
    dense_layers: list[int] = field(default_factory=list)  # MoE models' layers with a dense MLP instead
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not self.layer_windows:
            self.layer_windows = [None] * self.num_hidden_layers
        checks = [
            (self.norm_placement in NORM_PLACEMENTS, "norm_placement", self.norm_placement),
            (self.qk_norm in QK_NORMS, "qk_norm", self.qk_norm),
            (self.mlp_kind in MLP_KINDS.values(), "mlp_kind", self.mlp_kind),
            (len(self.layer_windows) == self.num_hidden_layers, "layer_windows", self.layer_windows),
            (all(w is None or w >= 1 for w in self.layer_windows), "sliding_window", self.layer_windows),
            (self.num_attention_heads % max(self.num_key_value_heads, 1) == 0, "num_key_value_heads",
             self.num_key_value_heads),
            (self.num_experts == 0 or 1 <= self.experts_per_token <= self.num_experts, "num_experts_per_tok",
             self.experts_per_token),
        ]
        for ok, name, value in checks:
            if not ok:
                raise LoraForgeError(f"{name}: invalid value {value!r}")
        RopeConfig(self.rope_theta, self.rope_scaling)  # validates the scaling

    @property
    def rope(self) -> RopeConfig:
        return RopeConfig(self.rope_theta, self.rope_scaling)

    def is_moe_layer(self, i: int) -> bool:
        return self.num_experts > 0 and i not in self.dense_layers

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            archs = cfg.get("architectures") or [model_type]
            raise LoraForgeError(
                f"{source}: unsupported architecture {archs[0]!r} (model_type {model_type!r}); "
                f"loraforge supports: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        fam = FAMILIES[model_type]
        try:
            c = _normalised(model_type, cfg)
            _refuse_unsupported(c, source)
            hidden, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
            n_layers = int(c["num_hidden_layers"])
            rope, rope_local = _rope(c, source)
            act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
            if act not in MLP_KINDS:
                raise LoraForgeError(f"{source}: hidden_act {act!r} is not supported (use one of {', '.join(MLP_KINDS)})")
            eos = c.get("eos_token_id")
            eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list) else [int(eos)])
            bias = bool(c.get("attention_bias", False))
            scalar = c.get("query_pre_attn_scalar")
            moe = fam.get("moe")
            experts = int(c.get("num_local_experts") or c.get("num_experts") or 0) if moe else 0
            return cls(
                vocab_size=int(c["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(c["intermediate_size"]),
                num_hidden_layers=n_layers,
                num_attention_heads=heads,
                num_key_value_heads=int(c.get("num_key_value_heads") or heads),
                head_dim=int(c.get("head_dim") or hidden // heads),
                rms_norm_eps=float(c.get("rms_norm_eps", 1e-5)),
                rope_theta=rope.theta,
                rope_scaling=rope.scaling,
                rope_local=rope_local,
                max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", c.get("tie_word_embeddings", False))),
                qkv_bias=fam.get("qkv_bias", bias),
                o_bias=fam.get("o_bias", bias),
                mlp_bias=bool(c.get("mlp_bias", False)),
                norm_placement=fam.get("norm_placement", "pre"),
                norm_unit_offset=fam.get("norm_unit_offset", False),
                qk_norm=fam.get("qk_norm"),
                layer_windows=_windows(c, n_layers),
                attn_scale=None if scalar is None else float(scalar) ** -0.5,
                attn_softcap=_opt_float(c.get("attn_logit_softcapping")),
                final_softcap=_opt_float(c.get("final_logit_softcapping")),
                embed_scale=fam.get("embed_scale", False),
                mlp_kind=MLP_KINDS[act],
                fused_qkv=fam.get("fused_qkv", False),
                fused_gate_up=fam.get("fused_gate_up", False),
                num_experts=experts,
                experts_per_token=int(c.get("num_experts_per_tok") or 0) if moe else 0,
                moe_intermediate_size=int(c.get("moe_intermediate_size") or c["intermediate_size"]) if moe else 0,
                moe_renormalize=True if moe == "mixtral" else bool(c.get("norm_topk_prob", False)),
                dense_layers=_dense_layers(c, n_layers) if moe else [],
                model_type=model_type,
                bos_token_id=c.get("bos_token_id"),
                eos_token_id=eos_ids,
                pad_token_id=c.get("pad_token_id"),
                hf_config=dict(cfg),
            )
        except KeyError as e:
            raise LoraForgeError(f"{source}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise LoraForgeError(f"{source}: malformed field ({e})") from None
        except LoraForgeError as e:
            msg = str(e)
            raise LoraForgeError(msg if msg.startswith(source) else f"{source}: {msg}") from None


def _normalised(model_type: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """config.json with transformers' defaults filled in and its legacy keys (rope_theta / rope_scaling at the
    top, Gemma 3's rope_local_base_freq) moved to where transformers 5 keeps them."""
    import logging
    import math

    from transformers import AutoConfig

    try:  # transformers 5 validates its configs as strict dataclasses
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        StrictDataclassError = ValueError  # noqa: N806

    for key, value in cfg.items():  # JSON allows Infinity / NaN; no field of ours does
        if isinstance(value, float) and not math.isfinite(value):
            raise OverflowError(f"{key} = {value}")
    keep = {k: v for k, v in cfg.items() if k not in ("model_type", "transformers_version", "auto_map")}
    level = logging.getLogger("transformers").level
    logging.getLogger("transformers").setLevel(logging.ERROR)  # its warnings about token ids and such
    try:
        return AutoConfig.for_model(model_type, **keep).to_dict()
    except (TypeError, ValueError, KeyError, AttributeError, StrictDataclassError) as e:  # strict validation
        raise ValueError(str(e).splitlines()[0]) from None
    finally:
        logging.getLogger("transformers").setLevel(level)


# Fields that change the maths, with the value(s) we implement; any other value is refused by name.
_NEUTRAL: dict[str, tuple] = {
    "attention_dropout": (0, 0.0, None),  # training-time dropout on attention weights
    "embd_pdrop": (0, 0.0, None),
    "resid_pdrop": (0, 0.0, None),
    "router_jitter_noise": (0, 0.0, None),
    "use_bidirectional_attention": (False, None),
    "output_router_logits": (False, None),  # the router's auxiliary loss added to the training loss
    "pretraining_tp": (1, None),
}


def _refuse_unsupported(c: dict[str, Any], source: str) -> None:
    for key, ok in _NEUTRAL.items():
        if key in c and c[key] not in ok:
            raise LoraForgeError(f"{source}: {key}={c[key]!r} is not supported by loraforge (it would change the "
                                 f"model's maths); supported: {', '.join(repr(v) for v in ok if v is not None)}")


def _rope_one(params: dict[str, Any], source: str, what: str) -> RopeConfig:
    params = dict(params)
    theta = float(params.pop("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if float(params.get("partial_rotary_factor", 1.0)) != 1.0:
        raise LoraForgeError(f"{source}: partial_rotary_factor={params['partial_rotary_factor']} is not supported "
                             "(loraforge rotates the whole head)")
    if kind not in ROPE_TYPES:
        raise LoraForgeError(f"{source}: {what} rope_type {kind!r} is not supported; use one of {', '.join(ROPE_TYPES)}")
    if kind == "default":
        return RopeConfig(theta, None)
    params["rope_type"] = kind
    params.pop("partial_rotary_factor", None)
    return RopeConfig(theta, params)


def _rope(c: dict[str, Any], source: str) -> tuple[RopeConfig, RopeConfig | None]:
    """(the rope of full-attention layers, the sliding layers' own or None), from transformers 5's
    rope_parameters: one dict, or one per layer type (Gemma 3)."""
    p = c.get("rope_parameters") or {"rope_theta": c.get("rope_theta", 10000.0), **(c.get("rope_scaling") or {})}
    if "full_attention" in p or "sliding_attention" in p:
        full = _rope_one(p.get("full_attention") or {}, source, "full_attention")
        local = p.get("sliding_attention")
        return full, None if local is None else _rope_one(local, source, "sliding_attention")
    local = c.get("rope_local_base_freq")  # Gemma 3 as transformers 4 describes it
    return _rope_one(p, source, "rope_parameters"), None if local is None else RopeConfig(float(local))


def _windows(c: dict[str, Any], n_layers: int) -> list[int | None]:
    """Per-layer sliding window. A family with `layer_types` names its sliding layers; the others (Mistral,
    Mixtral, Phi-3, Qwen3-MoE) apply `sliding_window`, when set, to every layer, as transformers does."""
    w = c.get("sliding_window")
    types = c.get("layer_types")
    if types is None:
        return [None if w is None else int(w)] * n_layers
    if len(types) != n_layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise LoraForgeError(f"layer_types: expected {n_layers} of 'full_attention' / 'sliding_attention', got {types!r}")
    if "sliding_attention" in types and w is None:
        raise LoraForgeError("layer_types names sliding_attention layers but sliding_window is not set")
    return [int(w) if t == "sliding_attention" else None for t in types]


def _dense_layers(c: dict[str, Any], n_layers: int) -> list[int]:
    """Qwen3-MoE's layers with a dense MLP: those in mlp_only_layers, and all but every decoder_sparse_step-th."""
    step = int(c.get("decoder_sparse_step") or 1)
    only = {int(i) for i in c.get("mlp_only_layers") or []}
    return [i for i in range(n_layers) if i in only or (i + 1) % step != 0]


def _opt_float(v) -> float | None:
    return None if v is None else float(v)
