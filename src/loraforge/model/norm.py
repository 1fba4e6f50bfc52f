"""RMSNorm, with Gemma's (1 + w) form as an option."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..ops import rms_norm


class RMSNorm(nn.Module):
    """y = x / rms(x) * w, normalised in fp32. unit_offset (Gemma): y = x / rms(x) * (1 + w), so its stored
    weights sit around 0 rather than 1."""

    def __init__(self, dim: int, eps: float, unit_offset: bool = False):
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # x: [*, dim]
        if not self.unit_offset:
            return rms_norm(x, self.weight, self.eps)
        # 1 + w in fp32 as Gemma's reference does (in bf16, 1 + w keeps only ~2 decimal digits of w), then the
        # result back in x's dtype
        return rms_norm(x, self.weight.float() + 1.0, self.eps).to(x.dtype)
