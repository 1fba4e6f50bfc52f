"""Fused and hand-written-backward ops, each beside its plain reference.

model/ calls these by name; what they compute is what the `*_ref` function beside each writes in plain
PyTorch. `use_reference()` (or LORAFORGE_REFERENCE_OPS=1) runs the references everywhere.
tests/test_ops.py compares every pair, forward and backward, in fp32 and under bf16 autocast.
"""

from .act import silu_mul, silu_mul_ref
from .attention import causal_attention, causal_attention_ref
from .dropout import dropout_mask, dropout_ref
from .gemm import SKINNY_MAX_TOKENS, frozen_linear
from .head_ce import IGNORE_INDEX, frozen_head_ce, frozen_head_ce_ref
from .lora import lora_linear, lora_linear_ref
from .norm import rms_norm, rms_norm_ref
from .recompute import RecomputeSaved
from .rope import apply_rope, apply_rope_ref, rotate_half
from .switch import compute_dtype, reference_ops, use_reference

__all__ = [
    "IGNORE_INDEX", "SKINNY_MAX_TOKENS", "RecomputeSaved", "apply_rope", "apply_rope_ref", "causal_attention",
    "causal_attention_ref", "compute_dtype",
    "dropout_mask", "dropout_ref",
    "frozen_head_ce", "frozen_head_ce_ref", "frozen_linear", "lora_linear", "lora_linear_ref",
    "reference_ops", "rms_norm", "rms_norm_ref", "rotate_half", "silu_mul", "silu_mul_ref", "use_reference",
]
