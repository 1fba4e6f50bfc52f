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
    projection (``gate_up_proj.e``, ``down_proj.e``: see model/experts_io.py's quantize_experts).

    ``delta``, when given, adds an adapter's low-rank term to a projection's output: ``delta(name, e, x)``
    returns [n, out] or None (lora/experts.py's LoraExperts passes it; the plain model has none)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.kind = cfg.mlp_kind
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * i, h))
        self.down_proj = nn.Parameter(torch.empty(E, h, i))

    def forward(self, x: Tensor, e: int, adapter_ids: Tensor | None = None, delta=None) -> Tensor:  # noqa: ARG002
        # x: [n, hidden] tokens routed to expert e -> [n, hidden]; adapter_ids: [n] (only a wrapper reads them)
        gate, up = self._proj("gate_up_proj", e, x, delta).chunk(2, dim=-1)  # [n, I] each
        return self._proj("down_proj", e, gated(self.kind, gate, up), delta)

    def _proj(self, name: str, e: int, x: Tensor, delta) -> Tensor:
        w = getattr(self, name)
        y = w[e](x) if isinstance(w, nn.ModuleList) else F.linear(x, w[e])  # [n, out]
        d = None if delta is None else delta(name, e, x)
        return y if d is None else y + d.to(y.dtype)


class MoE(nn.Module):
    """Each token runs through its top-k experts, weighted by the router's softmax probabilities (renormalised
    over the k chosen when cfg.moe_renormalize)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.k, self.renormalize = cfg.experts_per_token, cfg.moe_renormalize
        self.gate = Router(cfg.hidden_size, cfg.num_experts)
        self.experts = Experts(cfg)

    def forward(self, x: Tensor, adapter_ids: Tensor | None = None, recompute: bool = False) -> Tensor:  # noqa: ARG002
        """x: [B, S, H]; adapter_ids: [B] per-row adapters (expert LoRA reads them per token)."""
        B, S, H = x.shape
        x2 = x.reshape(-1, H)  # [N, H]
        probs = self.gate(x2).softmax(-1, dtype=torch.float32)  # [N, E]
        weights, chosen = probs.topk(self.k, dim=-1)  # [N, k]
        if self.renormalize:
            weights = weights / weights.sum(-1, keepdim=True)
        weights = weights.to(x.dtype)
        # per-token adapter ids, only for an adapter wrapper around the experts (ids may come on the CPU)
        plain = adapter_ids is None or isinstance(self.experts, Experts)
        token_ids = None if plain else adapter_ids.to(x.device).repeat_interleave(S)  # [N]
        out = torch.zeros_like(x2)
        for e in chosen.unique().tolist():
            token, slot = (chosen == e).nonzero(as_tuple=True)  # the tokens that chose e, and in which slot
            ids = None if token_ids is None else token_ids[token]
            out = out.index_add(0, token, self.experts(x2[token], e, ids) * weights[token, slot, None])
        return out.view(B, S, H)
