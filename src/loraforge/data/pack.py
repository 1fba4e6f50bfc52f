"""Packing short examples into rows, and collating examples into a batch of tensors.

A packed row must train exactly as its examples would apart. Three things make it so: the first token
of each example is not a label (else the previous example's last token would learn to predict it),
positions restart at 0 for each example (RoPE sees the same angles), and the attention mask is
block-diagonal causal (no token sees another example). With those, the loss of a packed batch equals
the token-weighted loss of its examples run one by one.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .encode import IGNORE_INDEX, Example


def pack_examples(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate consecutive examples into rows of at most `max_len` tokens, in order (greedy)."""
    rows, cur, cur_len = [], [], 0
    for ex in examples:
        n = len(ex.input_ids)
        if ex.doc_lens is not None:
            raise ValueError("pack_examples: example is already packed")
        if n > max_len:
            raise ValueError(f"pack_examples: a {n}-token example exceeds max_len={max_len}; encode with the same max_len")
        if cur and cur_len + n > max_len:
            rows.append(_join(cur))
            cur, cur_len = [], 0
        cur.append(ex)
        cur_len += n
    if cur:
        rows.append(_join(cur))
    return rows


def _join(parts: list[Example]) -> Example:
    ids, labels, positions = [], [], []
    for ex in parts:
        n = len(ex.input_ids)
        ids += ex.input_ids
        labels += [IGNORE_INDEX] + ex.labels[1:]
        positions += range(n)
    return Example(ids, labels, positions, [len(ex.input_ids) for ex in parts])


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor | None]:
    """Right-pad into tensors for `model(input_ids, positions=, attention_mask=, labels=)`.

    input_ids, labels: [B, S] (labels -100 on padding). For batches without packed rows positions and
    attention_mask are None: plain causal attention is exact with right padding, since real tokens never
    see the pads after them. With packed rows, positions: [B, S] and attention_mask: [B, 1, S, S] bool
    (True = may attend), block-diagonal causal.
    """
    B, S = len(examples), max(len(ex.input_ids) for ex in examples)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE_INDEX, dtype=torch.long)
    for i, ex in enumerate(examples):
        input_ids[i, : len(ex.input_ids)] = torch.tensor(ex.input_ids, dtype=torch.long)
        labels[i, : len(ex.labels)] = torch.tensor(ex.labels, dtype=torch.long)
    batch: dict[str, Tensor | None] = {"input_ids": input_ids, "labels": labels, "positions": None,
                                       "attention_mask": None}
    if all(ex.doc_lens is None for ex in examples):
        return batch
    # doc[b, t]: which example of row b token t belongs to. Padding forms one more block of its own, so
    # no query row of the mask is empty (an all-False row makes attention NaN, even where unused).
    doc = torch.empty((B, S), dtype=torch.long)
    positions = torch.empty((B, S), dtype=torch.long)
    for i, ex in enumerate(examples):
        lens = list(ex.doc_lens or [len(ex.input_ids)])
        lens.append(S - sum(lens))  # the padding block, possibly empty
        start = 0
        for d, n in enumerate(lens):
            doc[i, start: start + n] = d
            positions[i, start: start + n] = torch.arange(n)
            start += n
    causal = torch.ones(S, S, dtype=torch.bool).tril()  # [S, S]: query t sees keys 0..t
    mask = (doc[:, :, None] == doc[:, None, :]) & causal  # [B, S, S]
    batch["positions"] = positions
    batch["attention_mask"] = mask[:, None]  # [B, 1, S, S], broadcast over heads
    return batch
