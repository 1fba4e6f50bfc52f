"""Packing, collation and batch order: a packed batch trains exactly like its examples one by one."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from loraforge.data import IGNORE_INDEX, Batcher, Record, batches, collate, encode_records, pack_examples
from loraforge.errors import LoraForgeError
from loraforge.model import LlamaForCausalLM, ModelConfig, load_tokenizer, resolve_source

MAX_LEN = 96


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_source(None).folder)


@pytest.fixture(scope="module")
def examples(tok):
    records = []
    for i in range(12):  # a mix of kinds and lengths, so rows hold different numbers of examples
        if i % 3 == 0:
            records.append(Record("chat", f"d:{i}", messages=(("user", f"Count to {i}."),
                                                             ("assistant", " ".join(map(str, range(i + 1)))))))
        elif i % 3 == 1:
            records.append(Record("completion", f"d:{i}", prompt=f"Q{i}: what is {i} + {i}?\nA:", completion=f" {2 * i}"))
        else:
            records.append(Record("text", f"d:{i}", text="words " * (2 + 3 * i)))
    return encode_records(records, tok, MAX_LEN)


def test_pack_keeps_order_and_fits(examples):
    rows = pack_examples(examples, MAX_LEN)
    assert len(rows) < len(examples)
    assert all(len(r.input_ids) <= MAX_LEN for r in rows)
    assert [i for r in rows for i in r.input_ids] == [i for e in examples for i in e.input_ids]
    assert [n for r in rows for n in r.doc_lens] == [len(e.input_ids) for e in examples]
    # greedy: the next example would not have fit into the previous row
    for prev, nxt in pairwise(rows):
        assert len(prev.input_ids) + nxt.doc_lens[0] > MAX_LEN


def test_pack_masks_boundaries_and_restarts_positions(examples):
    rows = pack_examples(examples, MAX_LEN)
    it = iter(examples)
    for row in rows:
        start = 0
        for n in row.doc_lens:
            ex = next(it)
            assert row.labels[start] == IGNORE_INDEX  # nothing learns to predict across the boundary
            assert row.labels[start + 1: start + n] == ex.labels[1:]
            assert row.positions[start: start + n] == list(range(n))
            start += n


def test_pack_refuses_overlong_examples(examples):
    with pytest.raises(ValueError, match="exceeds max_len"):
        pack_examples(examples, 8)


def test_collate_unpacked_is_right_padded(examples, tok):
    batch = collate(examples[:4], tok.pad_token_id)
    assert batch["positions"] is None and batch["attention_mask"] is None
    S = max(len(e.input_ids) for e in examples[:4])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, S)
    for i, e in enumerate(examples[:4]):
        n = len(e.input_ids)
        assert batch["input_ids"][i, :n].tolist() == e.input_ids
        assert batch["labels"][i, :n].tolist() == e.labels
        assert (batch["input_ids"][i, n:] == tok.pad_token_id).all()
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all()


def test_collate_packed_mask_is_block_diagonal_causal(examples, tok):
    rows = pack_examples(examples, MAX_LEN)[:3]
    batch = collate(rows, tok.pad_token_id)
    mask, pos = batch["attention_mask"], batch["positions"]
    B, S = batch["input_ids"].shape
    assert mask.dtype == torch.bool and mask.shape == (B, 1, S, S)
    assert pos.shape == (B, S)
    for b, row in enumerate(rows):
        assert pos[b, : len(row.input_ids)].tolist() == row.positions
        edges = [0]
        for n in row.doc_lens + [S - len(row.input_ids)]:  # padding is a block of its own
            edges.append(edges[-1] + n)
        for lo, hi in pairwise(edges):
            block = mask[b, 0, lo:hi]  # the block's queries: [hi - lo, S]
            assert torch.equal(block[:, lo:hi], torch.ones(hi - lo, hi - lo, dtype=torch.bool).tril())
            assert not block[:, :lo].any() and not block[:, hi:].any()
    assert mask.any(-1).all()  # every query sees something, so attention never divides by zero


def tiny_model(vocab: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    return LlamaForCausalLM(cfg).eval()


def n_trained(ex) -> int:
    return sum(y != IGNORE_INDEX for y in ex.labels[1:])


def test_packed_loss_equals_token_weighted_unpacked_loss(examples, tok):
    model = tiny_model(len(tok))
    with torch.no_grad():
        singles = [model(collate([e], tok.pad_token_id)["input_ids"], labels=collate([e], tok.pad_token_id)["labels"])
                   for e in examples]
        weights = torch.tensor([n_trained(e) for e in examples], dtype=torch.float32)
        want = (torch.stack(singles) * weights).sum() / weights.sum()

        def loss(batch):
            return model(batch["input_ids"], positions=batch["positions"], attention_mask=batch["attention_mask"],
                         labels=batch["labels"])

        packed = collate(pack_examples(examples, MAX_LEN), tok.pad_token_id)
        torch.testing.assert_close(loss(packed), want)
        torch.testing.assert_close(loss(collate(examples, tok.pad_token_id)), want)  # padded: plain causal is exact
        # and the mask and positions are what make it so
        leaky = dict(packed, attention_mask=None, positions=None)
        assert not torch.allclose(loss(leaky), want, rtol=1e-3)


def test_packed_gradients_match_unpacked(examples, tok):
    model = tiny_model(len(tok))

    def grads(batch):
        model.zero_grad()
        model(batch["input_ids"], positions=batch["positions"], attention_mask=batch["attention_mask"],
              labels=batch["labels"]).backward()
        return [p.grad.clone() for p in model.parameters()]

    for got, want in zip(grads(collate(pack_examples(examples, MAX_LEN), tok.pad_token_id)),
                         grads(collate(examples, tok.pad_token_id)), strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    b0, b1 = batches(10, 3, seed=5, epoch=0), batches(10, 3, seed=5, epoch=1)
    assert [len(b) for b in b0] == [3, 3, 3, 1]
    assert sorted(i for b in b0 for i in b) == list(range(10))
    assert b0 == batches(10, 3, seed=5, epoch=0)
    assert b0 != b1 and b0 != batches(10, 3, seed=6, epoch=0)
    assert batches(5, 2, seed=0, epoch=3, shuffle=False) == [[0, 1], [2, 3], [4]]


def _ids(batch) -> list[int]:
    return [e.input_ids[0] for e in batch]


def test_batcher_resumes_at_the_exact_next_batch():
    examples = [type("E", (), {"input_ids": [i]})() for i in range(7)]  # only identity matters here
    straight = Batcher(examples, batch_size=2, seed=1)
    want = [_ids(straight.next_batch()) for _ in range(13)]  # crosses three epoch boundaries
    for cut in (1, 3, 4, 8):
        first = Batcher(examples, batch_size=2, seed=1)
        got = [_ids(first.next_batch()) for _ in range(cut)]
        state = dict(first.state_dict())
        resumed = Batcher(examples, batch_size=2, seed=1)
        resumed.load_state_dict(state)
        got += [_ids(resumed.next_batch()) for _ in range(13 - cut)]
        assert got == want, cut


def test_batcher_iterates_epoch_by_epoch():
    examples = [type("E", (), {"input_ids": [i]})() for i in range(5)]
    b = Batcher(examples, batch_size=2, seed=0)
    epoch0 = [_ids(x) for x in b]
    assert (b.epoch, b.step) == (0, len(b)) and len(epoch0) == len(b) == 3
    epoch1 = [_ids(x) for x in b]
    assert b.epoch == 1
    assert [[i for x in epoch0 for i in x], [i for x in epoch1 for i in x]] == [
        [i for idx in batches(5, 2, 0, e) for i in idx] for e in (0, 1)]
    # a run stopped mid-epoch continues the same epoch
    c = Batcher(examples, batch_size=2, seed=0)
    c.next_batch()
    assert [_ids(x) for x in c] == epoch0[1:]


def test_batcher_refuses_a_different_setup():
    examples = [type("E", (), {"input_ids": [i]})() for i in range(5)]
    state = Batcher(examples, batch_size=2, seed=0).state_dict()
    with pytest.raises(LoraForgeError, match="the checkpoint has batch_size=2, this run 3"):
        Batcher(examples, batch_size=3, seed=0).load_state_dict(state)
    with pytest.raises(LoraForgeError, match="the checkpoint has n=5, this run 4"):
        Batcher(examples[:4], batch_size=2, seed=0).load_state_dict(state)
