"""What the engine keeps per request, and what it hands out: a step's new text and tokens, a whole completion."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..generate import SamplingParams


@dataclass
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # None = the base model
    # engine state
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded output so far (stop strings cut off)
    sent: int = 0  # characters of `text` already handed out
    slot: int = -1
    prefix_len: int = 0  # P: a prefix adapter's positions before the prompt in the slot
    logprobs: int | None = None  # None: none returned; k: each token's log-probability and the k most likely
    last_logprob: TokenLogprob | None = None  # of the token just drawn
    finish_reason: str | None = None
    generator: torch.Generator | None = None


# (token id, its log-probability, [(id, log-probability)] of the k most likely tokens at that step)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class StepOutput:
    request_id: str
    text: str  # new text since the last output of this request
    token_ids: list[int]  # new tokens since the last output
    finish_reason: str | None  # None while running; "stop", "length", "abort" or "error" at the end
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when the request asked


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
