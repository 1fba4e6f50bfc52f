"""Rotary position embeddings: inverse frequencies for each scaling transformers has for our families.

    default  theta^(-2i/D)
    linear   default / factor (positions interpolated)
    llama3   long wavelengths / factor, short ones kept, a smooth ramp between (Llama 3.1)
    yarn     per-frequency blend of interpolation and extrapolation, and cos/sin scaled by an attention
             factor (YaRN, Peng et al. 2023; Qwen's long-context configs)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .config import RopeConfig


def inv_freq_and_scale(rope: RopeConfig, head_dim: int, max_position: int) -> tuple[Tensor, float]:
    """([head_dim / 2] fp32 inverse frequencies, the factor cos and sin are multiplied by)."""
    d = head_dim
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))  # [D/2]
    sc = rope.scaling
    if sc is None:
        return inv_freq.float(), 1.0
    kind, factor = sc["rope_type"], sc.get("factor")
    if kind == "linear":
        return (inv_freq / float(factor)).float(), 1.0
    if kind == "llama3":
        return llama3_inv_freq(inv_freq, sc).float(), 1.0
    return _yarn(rope, d, max_position)


def llama3_inv_freq(inv_freq: Tensor, sc: dict) -> Tensor:
    """Default inverse frequencies under a llama3 scaling `sc`, in their own dtype (llama.cpp's rope_freqs,
    written by export/gguf_model.py and read back by gguf_read.py, are inv_freq over this)."""
    lo, hi = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
    old_ctx, factor = float(sc["original_max_position_embeddings"]), float(sc["factor"])
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > old_ctx / lo, inv_freq / factor, inv_freq)
    mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
    return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)


def _yarn(rope: RopeConfig, d: int, max_position: int) -> tuple[Tensor, float]:
    sc = rope.scaling
    old_ctx = float(sc["original_max_position_embeddings"])
    factor = float(sc.get("factor") or max_position / old_ctx)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn = sc.get("attention_factor")
    if attn is None:
        m, m_all = sc.get("mscale"), sc.get("mscale_all_dim")
        attn = mscale(factor, m) / mscale(factor, m_all) if (m and m_all) else mscale(factor)

    def dim_of(rotations: float) -> float:  # the dimension whose wavelength turns `rotations` times in old_ctx
        return d * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = dim_of(sc.get("beta_fast") or 32), dim_of(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    # computed in fp32 as transformers does: the blend lands on its exact values
    pos_freqs = rope.theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency (high frequencies), 0: interpolate
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn)


def cos_sin(inv_freq: Tensor, scale: float, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """positions: [B, S] -> cos, sin: [B, 1, S, D]."""
    freqs = positions[..., None].float() * inv_freq.to(positions.device)  # [B, S, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)  # [B, S, D]
    cos, sin = emb.cos(), emb.sin()
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    return cos.to(dtype)[:, None], sin.to(dtype)[:, None]
