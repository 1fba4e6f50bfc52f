"""Former home of the Llama-only decoder; every family now shares model/decoder.py (configured by
model/config.py) and the fused ops live in loraforge.ops. These names stay importable from here."""

from ..ops import RecomputeSaved, apply_rope, frozen_linear, rotate_half
from .attention import Attention
from .decoder import Backbone, CausalLM, DecoderLayer
from .linear import Linear
from .masks import causal_mask
from .mlp import MLP
from .norm import RMSNorm

LlamaForCausalLM = CausalLM

__all__ = ["MLP", "Attention", "Backbone", "CausalLM", "DecoderLayer", "Linear", "LlamaForCausalLM", "RMSNorm",
           "RecomputeSaved", "apply_rope", "causal_mask", "frozen_linear", "rotate_half"]
