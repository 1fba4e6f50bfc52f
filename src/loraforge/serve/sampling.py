"""Per-request sampling: temperature, then top-k, then top-p, drawn with the request's own generator.

The distribution is the one ``loraforge.generate.sample`` draws from, computed without its full-vocabulary
sort and ``torch.multinomial``: on CPU each of those costs ~15 ms for a 49k vocabulary, more than a
whole decode step of a small model. The kept tokens are always the most likely ones, so ``topk`` on a
growing k finds them, and one uniform draw against their cumulative probabilities picks the token.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..generate import SamplingParams


def nucleus(logits: Tensor, p: SamplingParams) -> tuple[Tensor, Tensor]:
    """logits: [V] -> (token ids [K], probabilities [K]) of the tokens that may be drawn (most likely first
    when a top-k or top-p cut applies)."""
    x = logits.float() / p.temperature
    V = x.shape[-1]
    m = min(p.top_k, V) if p.top_k else V  # top-k keeps the m most likely
    if m == V and p.top_p >= 1.0:  # no cut: every token, in vocabulary order
        return torch.arange(V, device=x.device), x.softmax(-1)
    lse = torch.topk(x, m).values.logsumexp(-1) if m < V else x.logsumexp(-1)  # normaliser over those m
    k = m if p.top_p >= 1.0 else min(m, 64)
    while True:
        vals, ids = torch.topk(x, k)  # sorted, most likely first
        probs = (vals - lse).exp()
        # top-p drops a token when the tokens ranked above it already cover top_p: once the first k cover
        # more than top_p, every later token is dropped, so these k hold all that is kept.
        if k == m or float(probs.sum()) > p.top_p:
            break
        k = min(m, 4 * k)
    if p.top_p < 1.0:
        keep = probs.cumsum(-1) - probs <= p.top_p
        ids, probs = ids[keep], probs[keep]
    return ids, probs / probs.sum()


def sample_row(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> int:
    """One token id from logits [V] (argmax at temperature 0)."""
    if p.temperature == 0:
        return int(logits.argmax())
    ids, probs = nucleus(logits, p)
    cdf = probs.double().cumsum(-1)
    u = torch.rand((1,), generator=generator, dtype=torch.float64, device=cdf.device) * cdf[-1]
    return int(ids[torch.searchsorted(cdf, u, right=True).clamp(max=ids.shape[0] - 1)])


def sample_batch(logits: Tensor, params: list[SamplingParams], generators: list) -> list[int]:
    """logits: [B, V] -> B token ids: greedy rows by one argmax, sampled rows each with its own params."""
    out = logits.argmax(-1).tolist()
    for b, (p, g) in enumerate(zip(params, generators, strict=True)):
        if p.temperature > 0:
            out[b] = sample_row(logits[b], p, g)
    return out
