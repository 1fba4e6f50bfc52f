"""Scoring a model on data: token-weighted mean loss, perplexity, and exact match of greedy completions.

Used by the trainer for validation and by `loraforge eval` for base vs adapter.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import IGNORE_INDEX, Example, Record, collate, prompt_and_reference
from ..prefix.module import active_prefix, prefix_kwargs


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, no gradient checkpointing) and no autograd inside; the old mode after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def trained_tokens(labels: torch.Tensor) -> int:
    """Tokens the loss covers: labels are not shifted, so position 0 never counts."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float past ~709


def batch_loss(model: nn.Module, batch: dict[str, Any], device: torch.device,
               batch_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> torch.Tensor:
    """The mean next-token loss of one collated batch (from `loraforge.data.collate`)."""
    b = {k: (v.to(device) if v is not None else None) for k, v in batch.items()}
    kwargs = {"positions": b["positions"], "attention_mask": b["attention_mask"], "labels": b["labels"]}
    if batch_kwargs is not None:
        kwargs.update(batch_kwargs(b))
    elif (prefix := active_prefix(model, b["input_ids"].shape[0])) is not None:
        # a loaded prefix adapter is the active one (`loraforge eval`): apply it as generate() does
        kwargs.update(prefix_kwargs(prefix, kwargs["positions"], kwargs["attention_mask"]))
    # No autocast: the base is stored in its compute dtype (`--dtype`), and the LoRA op casts the fp32
    # master weights to it; norms, softmax and the loss accumulate in fp32 inside the ops.
    return model(b["input_ids"], **kwargs)


def mean_loss(model: nn.Module, examples: list[Example], pad_id: int, batch_size: int,
              batch_kwargs: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> float:
    """Token-weighted mean loss over `examples` (the loss of all their tokens as one set)."""
    device = model.inv_freq.device
    # Similar lengths together: less padding, and the mean does not depend on the order.
    order = sorted(examples, key=lambda e: len(e.input_ids))
    total, count = 0.0, 0
    with evaluating(model):
        for i in range(0, len(order), batch_size):
            batch = collate(order[i: i + batch_size], pad_id)
            n = trained_tokens(batch["labels"])
            if n:
                total += float(batch_loss(model, batch, device, batch_kwargs)) * n
                count += n
    return total / count if count else math.nan


@dataclass
class ExactMatch:
    correct: int
    total: int  # records with a reference (plain-text records have none)
    predictions: list[str | None]  # per record, None where there is no reference

    @property
    def fraction(self) -> float | None:
        return self.correct / self.total if self.total else None


def exact_match(model: nn.Module, tokenizer, records: list[Record], max_new_tokens: int | None = None,
                batch_size: int = 8) -> ExactMatch:
    """Greedy completion of each record's prompt compared with its reference, whitespace stripped.

    Chat records are prompted with every message before the last assistant turn (through the chat
    template); prompt/completion records with the raw prompt, as they were trained.
    """
    from ..generate import SamplingParams, encode_prompt, generate

    pairs = [prompt_and_reference(r) for r in records]
    todo = [i for i, (_, ref) in enumerate(pairs) if ref is not None]
    preds: list[str | None] = [None] * len(records)
    if not todo:
        return ExactMatch(0, 0, preds)
    if max_new_tokens is None:  # room for the longest reference and its end-of-turn, not much more
        longest = max(len(tokenizer(pairs[i][1], add_special_tokens=False)["input_ids"]) for i in todo)
        max_new_tokens = longest + 8
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    def is_chat(i: int) -> bool:
        return isinstance(pairs[i][0], list)

    # Batch prompts of one kind and similar length (generate left-pads each batch to its longest).
    for chat in (True, False):
        group = sorted((i for i in todo if is_chat(i) == chat),
                       key=lambda i: len(encode_prompt(tokenizer, pairs[i][0], chat)))
        with evaluating(model):
            for s in range(0, len(group), batch_size):
                idx = group[s: s + batch_size]
                outs = generate(model, tokenizer, [pairs[i][0] for i in idx], params, chat=chat)
                for i, text in zip(idx, outs, strict=True):
                    preds[i] = text
    correct = sum(preds[i].strip() == pairs[i][1].strip() for i in todo)
    return ExactMatch(correct, len(todo), preds)


def score(model: nn.Module, tokenizer, records: list[Record], examples: list[Example], batch_size: int = 8,
          max_new_tokens: int | None = None) -> dict[str, Any]:
    """{"loss", "perplexity", "exact_match", ...} of the model as it is now (active adapter or base), and
    "predictions": each record's greedy completion (None for records without a reference)."""
    loss = mean_loss(model, examples, tokenizer.pad_token_id, batch_size)
    em = exact_match(model, tokenizer, records, max_new_tokens, batch_size)
    return {"loss": loss, "perplexity": perplexity(loss), "exact_match": em.fraction,
            "exact_match_count": em.correct, "exact_match_total": em.total, "predictions": em.predictions}
