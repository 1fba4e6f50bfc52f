"""Text generation: prompt encoding, sampling, and a batched decode loop over our KV cache."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import LoraForgeError
from .model.cache import KVCache
from .prefix.module import active_prefix

log = logging.getLogger("loraforge")


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    min_tokens: int = 0  # end-of-sequence tokens cannot be drawn before this many (vLLM's min_tokens)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise LoraForgeError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise LoraForgeError(f"min_tokens must be in [0, max_tokens = {self.max_new_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise LoraForgeError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LoraForgeError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LoraForgeError(f"top_k must be >= 0, got {self.top_k}")


def encode_prompt(tokenizer, prompt: str | list[dict], chat: bool = True) -> list[int]:
    """Token ids of a prompt: through the chat template (with the assistant header) unless chat=False."""
    if isinstance(prompt, list) or chat:
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return tokenizer(text, add_special_tokens=False)["input_ids"]
        prompt = "\n".join(m["content"] for m in msgs)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def fit_prompt(ids: list[int], context: int, max_new_tokens: int, truncate: bool = False) -> list[int]:
    """`ids` when they and `max_new_tokens` fit in `context` positions, as the server requires; with
    `truncate`, the last tokens of the prompt that do (a warning says how many were cut). Past the context
    the positions are ones the model never saw, and it answers with blank lines or garbage."""
    if len(ids) + max_new_tokens <= context:
        return ids
    keep = context - max_new_tokens
    if keep < 1:
        raise LoraForgeError(f"max_new_tokens {max_new_tokens}: the model's context is {context} tokens, which "
                             "must also hold the prompt; ask for fewer new tokens")
    if truncate:
        log.warning("the prompt is %d tokens: kept its last %d, so that they and %d new tokens fit the model's "
                    "context of %d", len(ids), keep, max_new_tokens, context)
        return ids[-keep:]
    raise LoraForgeError(f"the prompt is {len(ids)} tokens and max_new_tokens is {max_new_tokens}, but the model's "
                         f"context is {context} tokens; shorten the prompt, lower max_new_tokens, or truncate the "
                         f"prompt to its last {keep} tokens (--truncate-prompt)")


def stop_token_ids(model, tokenizer) -> set[int]:
    ids = set(model.config.eos_token_id)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def sample(logits: Tensor, p: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """logits: [B, V] -> next token ids [B]."""
    if p.temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / p.temperature
    if p.top_k:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = probs.cumsum(-1) - probs > p.top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate_ids(
    model,
    prompts: list[list[int]],
    params: SamplingParams,
    eos_ids: set[int],
    adapter_ids: Tensor | None = None,
    prefix: list[tuple[Tensor, Tensor]] | None = None,
) -> list[list[int]]:
    """Generate for a batch of token-id prompts (left-padded together). Returns the new ids per row.

    prefix: per-layer (k, v) [1 or B, Hkv, P, D]; by default the active prefix adapter's, if any.
    """
    dev = model.inv_freq.device
    B = len(prompts)
    vocab = model.config.vocab_size
    for p in prompts:
        bad = next((t for t in p if not 0 <= t < vocab), None)
        if bad is not None:
            raise LoraForgeError(f"prompt token id {bad} is outside the model's vocabulary of {vocab} ids: the "
                                 "tokenizer does not belong to this model (check the model folder's tokenizer files)")
    if prefix is None:
        prefix = active_prefix(model, 1, adapter_ids)
    L = max(len(p) for p in prompts)
    P = prefix[0][0].shape[2] if prefix else 0
    total = P + L + params.max_new_tokens
    cache = KVCache.for_model(model, B, total, dtype=model.model.embed_tokens.weight.dtype, device=dev)
    if prefix:
        for i, (k, v) in enumerate(prefix):  # the prefix is just the first P cached keys/values
            cache.k[i, :, :, :P] = k.expand(B, -1, -1, -1)
            cache.v[i, :, :, :P] = v.expand(B, -1, -1, -1)
        cache.advance(P)
    pad = 0
    ids = torch.full((B, L), pad, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        cache.key_mask[b, P:P + L - len(p)] = False  # left padding is never attended to
    # positions count real tokens only, so a padded row sees the same positions as it would alone
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    positions = (torch.arange(L, device=dev)[None, :] - (L - lens)[:, None]).clamp(min=0) + P
    gen = None
    if params.seed is not None:
        gen = torch.Generator(device=dev).manual_seed(params.seed)
    logits = model(ids, positions=positions, cache=cache, adapter_ids=adapter_ids, logits_to_keep=1)[:, -1]
    out: list[list[int]] = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    eos = torch.tensor(sorted(eos_ids), device=dev)
    pos = positions[:, -1:] + 1
    for step in range(params.max_new_tokens):
        if step < params.min_tokens and len(eos):  # too early to end: no end-of-sequence token may be drawn
            logits[:, eos] = float("-inf")
        nxt = sample(logits, params, gen)  # [B]
        for b in range(B):
            if not done[b]:
                out[b].append(int(nxt[b]))
        done |= torch.isin(nxt, eos)
        if bool(done.all()):
            break
        logits = model(nxt[:, None], positions=pos, cache=cache, adapter_ids=adapter_ids)[:, -1]
        pos = pos + 1
    return out


def generate(
    model,
    tokenizer,
    prompts: list[str | list[dict]],
    params: SamplingParams | None = None,
    *,
    chat: bool = True,
    adapter_ids: Tensor | None = None,
    prefix: list[tuple[Tensor, Tensor]] | None = None,
    truncate_prompt: bool = False,
) -> list[str]:
    """Completions for a batch of prompts (strings or chat message lists), special tokens stripped.

    A prompt that leaves no room for max_new_tokens in the model's context (less a prefix adapter's
    virtual tokens) is refused, or with `truncate_prompt` cut from the left (see fit_prompt).
    """
    params = params or SamplingParams()
    if prefix is None:
        with torch.no_grad():
            prefix = active_prefix(model, 1, adapter_ids)
    context = model.config.max_position_embeddings - (prefix[0][0].shape[2] if prefix else 0)
    encoded = [fit_prompt(encode_prompt(tokenizer, p, chat), context, params.max_new_tokens, truncate_prompt)
               for p in prompts]
    eos = stop_token_ids(model, tokenizer)
    new = generate_ids(model, encoded, params, eos, adapter_ids=adapter_ids, prefix=prefix)
    return [decode_until_stop(tokenizer, ids, eos, params.stop)[0] for ids in new]


def decode_until_stop(tokenizer, ids: list[int], eos: set[int], stop: list[str]) -> tuple[str, bool]:
    """The text of `ids` without end-of-sequence or special tokens, cut before the earliest stop string
    (which is not part of it); and whether a stop string was found."""
    text = tokenizer.decode([i for i in ids if i not in eos], skip_special_tokens=True)
    hits = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)
