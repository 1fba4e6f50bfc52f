"""Feed-forward blocks: the gated MLP (SwiGLU, or GeGLU with tanh GELU; Phi-3 fuses gate and up into one
projection) and the mixture-of-experts block (Mixtral, Qwen3-MoE).

Names and layouts follow transformers 5 in memory: ``gate_proj``/``up_proj``/``down_proj`` or
``gate_up_proj``; for MoE ``mlp.gate`` (the router, [E, hidden]) and ``mlp.experts.gate_up_proj``
[E, 2I, hidden] / ``mlp.experts.down_proj`` [E, hidden, I]. (On disk checkpoints keep one tensor per expert;
model/loading.py stacks them.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import RecomputeSaved, silu_mul
from .config import ModelConfig
from .linear import Linear


def gated(kind: str, gate: Tensor, up: Tensor) -> Tensor:
    """act(gate) * up: [*, I]."""
    if kind == "swiglu":
        return silu_mul(gate, up)
    return F.gelu(gate, approximate="tanh") * up


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate: int | None = None):
        super().__init__()
        h, i = cfg.hidden_size, intermediate or cfg.intermediate_size
        self.kind, self.fused = cfg.mlp_kind, cfg.fused_gate_up
        if self.fused:
            self.gate_up_proj = Linear(h, 2 * i, bias=cfg.mlp_bias)
        else:
            self.gate_proj = Linear(h, i, bias=cfg.mlp_bias)
            self.up_proj = Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: Tensor, adapter_ids: Tensor | None, recompute: bool = False) -> Tensor:
        if self.fused:
            gate, up = self.gate_up_proj(x, adapter_ids).chunk(2, dim=-1)  # [B, S, I] each
        else:
            gate, up = self.gate_proj(x, adapter_ids), self.up_proj(x, adapter_ids)  # [B, S, I]
        h = gated(self.kind, gate, up)
        if not recompute:
            return self.down_proj(h, adapter_ids)
        # down_proj keeps its input for the adapter's gradient; rebuild it from gate and up instead
        with RecomputeSaved(h, lambda: gated(self.kind, gate, up)):
            return self.down_proj(h, adapter_ids)


class Router(nn.Module):
    """The expert-choosing linear map, [E, hidden]. Not an nn.Linear on purpose: LoRA's all-linear and
    quantization pass over it (a quantized or adapted router would change which experts run)."""

    def __init__(self, hidden: int, n_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_experts, hidden))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)  # [N, E]


class Experts(nn.Module):
    """E gated MLPs stored as two stacked tensors, or (QLoRA) as one frozen quantized linear per expert and
    projection (``gate_up_proj.e``, ``down_proj.e``: see model/experts_io.py's quantize_experts)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.kind = cfg.mlp_kind
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(E, h, i))

    def forward(self, x: Tensor, e: int) -> Tensor:
        # x: [n, hidden] tokens routed to expert e -> [n, hidden]
        gate, up = self._proj(self.gate_up_proj, e, x).chunk(2, dim=-1)  # [n, I] each
        return self._proj(self.down_proj, e, gated(self.kind, gate, up))

    @staticmethod
    def _proj(w: Tensor | nn.ModuleList, e: int, x: Tensor) -> Tensor:
        return w[e](x) if isinstance(w, nn.ModuleList) else F.linear(x, w[e])


class MoE(nn.Module):
    """Each token runs through its top-k experts, weighted by the router's softmax probabilities (renormalised
    over the k chosen when cfg.moe_renormalize)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.renormalize = cfg.experts_per_token, cfg.moe_renormalize
        self.gate = Router(cfg.hidden_size, cfg.num_experts)
        self.experts = Experts(cfg)

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None, recompute: bool = False) -> Tensor:  # noqa: ARG002
        B, S, H = x.shape
        x2 = x.reshape(-1, H)  # [N, H]
        probs = self.gate(x2).softmax(-1, dtype=torch.float32)  # [N, E]
        weights, chosen = probs.topk(self.k, dim=-1)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x2)
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens that chose e, and in which slot
            out = out.index_add(0, token, self.experts(x2[token], e) * weights[token, slot, None])
        return out.view(B, S, H)
