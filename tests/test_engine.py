"""The serving engine on a tiny random Llama: mixed-adapter batches, continuous batching, sampling, adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from loraforge.errors import LoraForgeError
from loraforge.generate import SamplingParams, generate_ids
from loraforge.lora import LoraConfig, add_lora, delete_adapter, get_adapter_params, save_adapter, set_adapter
from loraforge.serve import Engine, ServeError
from loraforge.serve.sampling import nucleus, sample_row

NAMES = ["a0", "a1", "a2", "a3"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matmuls run best on one thread


def make_adapters(model, out: Path, names=NAMES, std: float = 0.3) -> dict[str, Path]:
    """Save one LoRA folder per name (ranks differ, B random and non-zero) and leave the model bare."""
    dirs = {}
    for i, name in enumerate(names):
        targets = "all-linear" if i % 2 == 0 else ["q_proj", "v_proj", "down_proj"]
        add_lora(model, name, LoraConfig(r=2 + 2 * i, alpha=8, dropout=0.0, targets=targets), activate=False)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for key, p in get_adapter_params(model, name).items():
                if key.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=g) * std)
                else:  # seeded too (Kaiming-uniform's range): the texts must not depend on earlier tests' draws
                    p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) / p.shape[1] ** 0.5)
        dirs[name] = save_adapter(model, name, out / name)
        delete_adapter(model, name)
    return dirs


def prompts_for(tok, n: int) -> list[list[int]]:
    words = ["the cat", "a long and winding road that", "hello", "numbers: 1 2 3", "Paris is", "why"]
    return [tok(f"{words[i % len(words)]} {i}", add_special_tokens=True)["input_ids"] for i in range(n)]


@pytest.fixture()
def engine(tiny, tmp_path):
    model, tok = tiny
    dirs = make_adapters(model, tmp_path)
    eng = Engine(model, tok, max_batch=4, max_len=128)
    for name, d in dirs.items():
        eng.load_adapter(name, d)
    eng.dirs = dirs
    return eng


def test_mixed_batch_equals_each_request_alone(engine):
    tok = engine.tokenizer
    prompts = prompts_for(tok, 10)
    adapters = [None, *NAMES] * 2
    sp = SamplingParams(max_new_tokens=12)
    alone = [engine.generate([p], sp, [a])[0].token_ids for p, a in zip(prompts, adapters, strict=True)]
    # 10 requests on 4 slots: requests join as others leave, so rows keep meeting new neighbours.
    mixed = [c.token_ids for c in engine.generate(prompts, sp, adapters)]
    assert mixed == alone
    # the adapters really act: the same prompt gives different continuations under each of them
    outs = {a: engine.generate([prompts[0]], sp, [a])[0].token_ids for a in [None, *NAMES]}
    assert len({tuple(v) for v in outs.values()}) == 5


def test_engine_matches_single_adapter_reference(engine):
    """Each row of a mixed batch equals the plain one-adapter path (set_adapter + generate_ids)."""
    model = engine.model
    prompts = prompts_for(engine.tokenizer, 5)
    adapters = [None, *NAMES]
    sp = SamplingParams(max_new_tokens=10)
    got = [c.token_ids for c in engine.generate(prompts, sp, adapters)]
    for p, a, g in zip(prompts, adapters, got, strict=True):
        set_adapter(model, a)
        want = generate_ids(model, [p], sp, engine.eos)[0]
        assert g == want, a
    set_adapter(model, None)


def test_requests_join_and_leave_a_running_batch(engine):
    tok = engine.tokenizer
    p1, p2, p3 = prompts_for(tok, 3)
    sp_long, sp_short = SamplingParams(max_new_tokens=16), SamplingParams(max_new_tokens=4)
    alone = [engine.generate([p], sp, [a])[0].token_ids
             for p, sp, a in ((p1, sp_long, "a0"), (p2, sp_short, "a1"), (p3, sp_long, None))]
    tokens: dict[str, list[int]] = {}
    sizes = []
    r1 = engine.add_request(p1, sp_long, "a0")
    for _ in range(3):
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
    r2 = engine.add_request(p2, sp_short, "a1")  # joins while r1 is mid-generation
    r3 = engine.add_request(p3, sp_long, None)
    while engine.has_unfinished():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.token_ids)
        sizes.append(len(engine.running))
    assert [tokens[r] for r in (r1, r2, r3)] == alone
    assert 3 in sizes and 2 in sizes  # r2 left early, the others kept going
    assert engine.running == [] and not engine.has_unfinished()


def test_seeded_sampling_is_reproducible_alone_or_batched(engine):
    prompts = prompts_for(engine.tokenizer, 4)
    seeded = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    alone = engine.generate([prompts[0]], seeded, ["a1"])[0].token_ids
    others = [SamplingParams(max_new_tokens=12, temperature=0.8, seed=s) for s in (1, 2, 3)]
    batch = engine.generate(prompts, [seeded, *others], ["a1", "a2", None, "a3"])
    assert batch[0].token_ids == alone
    other_seed = engine.generate([prompts[0]], SamplingParams(max_new_tokens=12, temperature=1.0, seed=8), ["a1"])
    greedy = engine.generate([prompts[0]], SamplingParams(max_new_tokens=12), ["a1"])
    assert other_seed[0].token_ids != alone or greedy[0].token_ids != alone


def test_stop_strings_end_the_text_and_are_never_streamed(engine):
    p = prompts_for(engine.tokenizer, 1)[0]
    full = engine.generate([p], SamplingParams(max_new_tokens=20), ["a2"])[0]
    assert full.finish_reason == "length" and len(full.token_ids) == 20
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 3]
    assert stop.strip()
    rid = engine.add_request(p, SamplingParams(max_new_tokens=20, stop=["@@never@@", stop]), "a2")
    deltas, reason = [], None
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            deltas.append(o.text)
            reason = o.finish_reason or reason
    text = "".join(deltas)
    assert reason == "stop"
    assert text == full.text[: full.text.index(stop)]
    assert all(stop not in "".join(deltas[: i + 1]) for i in range(len(deltas)))


def test_abort_frees_the_slot(engine):
    prompts = prompts_for(engine.tokenizer, 2)
    r1 = engine.add_request(prompts[0], SamplingParams(max_new_tokens=50), "a0")
    r2 = engine.add_request(prompts[1], SamplingParams(max_new_tokens=5), "a1")
    engine.step()
    engine.abort(r1)
    reasons = {}
    while engine.has_unfinished():
        for o in engine.step():
            if o.finish_reason:
                reasons[o.request_id] = o.finish_reason
    assert reasons == {r1: "abort", r2: "length"}
    assert not engine.adapter_busy("a0") and not engine.adapter_busy("a1")
    assert engine.metrics.snapshot()["requests_served"] == 1


def test_request_validation(engine):
    p = prompts_for(engine.tokenizer, 1)[0]
    with pytest.raises(ServeError, match="maximum context length is 128") as e:
        engine.add_request(p * 100, SamplingParams(max_new_tokens=4))
    assert e.value.status == 400
    with pytest.raises(ServeError, match="maximum context length"):
        engine.add_request(p, SamplingParams(max_new_tokens=128))
    with pytest.raises(ServeError, match="empty"):
        engine.add_request([], SamplingParams())
    with pytest.raises(ServeError, match="token ids"):
        engine.add_request([10**9], SamplingParams())
    with pytest.raises(ServeError, match="does not exist") as e:
        engine.add_request(p, SamplingParams(max_new_tokens=4), adapter="nope")
    assert e.value.status == 404
    assert engine.resolve_model(engine.base_name) is None and engine.resolve_model("a2") == "a2"
    with pytest.raises(ServeError) as e:
        engine.resolve_model("gpt-4")
    assert e.value.status == 404 and e.value.param == "model"
    assert not engine.has_unfinished()


def test_unload_refused_while_in_use_then_allowed(engine):
    p = prompts_for(engine.tokenizer, 1)[0]
    rid = engine.add_request(p, SamplingParams(max_new_tokens=6), "a3")
    engine.step()
    with pytest.raises(ServeError, match="in flight") as e:
        engine.unload_adapter("a3")
    assert e.value.status == 409
    engine.begin_unload("a3")  # draining: no new requests for it
    with pytest.raises(ServeError):
        engine.add_request(p, SamplingParams(max_new_tokens=4), adapter="a3")
    assert engine.adapter_busy("a3")
    finished = set()
    while engine.has_unfinished():
        finished |= {o.request_id for o in engine.step() if o.finish_reason}
    assert finished == {rid} and not engine.adapter_busy("a3")
    engine.unload_adapter("a3")
    assert "a3" not in engine.adapters
    # ids of the remaining adapters shifted; rows still get their own adapter
    again = engine.generate([p], SamplingParams(max_new_tokens=6), ["a0"])[0].token_ids
    engine.load_adapter("a3", engine.dirs["a3"])
    assert engine.generate([p], SamplingParams(max_new_tokens=6), ["a0"])[0].token_ids == again


def test_bad_adapters_are_refused_and_leave_the_engine_intact(engine, tmp_path, make_tiny_folder_other):
    p = prompts_for(engine.tokenizer, 1)[0]
    before = engine.generate([p], SamplingParams(max_new_tokens=6), ["a1"])[0].token_ids
    with pytest.raises(ServeError, match="already in use"):
        engine.load_adapter("a1", engine.dirs["a2"])
    with pytest.raises(ServeError, match="lora_name"):
        engine.load_adapter("x.y", engine.dirs["a2"])
    other = tmp_path / "other-kind"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ServeError, match="LoRA and prefix-tuning adapters"):
        engine.load_adapter("ia3", other)
    with pytest.raises(LoraForgeError, match="another model"):
        engine.load_adapter("other", make_tiny_folder_other)
    with pytest.raises(LoraForgeError, match="no such adapter folder"):
        engine.load_adapter("missing", tmp_path / "missing")
    assert sorted(engine.adapters) == NAMES
    assert engine.generate([p], SamplingParams(max_new_tokens=6), ["a1"])[0].token_ids == before


@pytest.fixture()
def make_tiny_folder_other(tmp_path, tiny_folder):
    """A LoRA folder made for a wider model (hidden 48): loading it on the tiny model must fail."""
    from conftest import make_tiny_folder

    from loraforge.model import load_model

    folder = make_tiny_folder(tmp_path / "wide", tiny_folder, hidden_size=48, num_attention_heads=6,
                              num_key_value_heads=2)
    wide, _ = load_model(str(folder))
    return make_adapters(wide, tmp_path / "wide-adapters", names=["w"])["w"]


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 1.0), (50, 1.0), (0, 0.9), (20, 0.5), (0, 0.01), (5000, 0.999)])
def test_nucleus_is_the_sort_based_top_k_top_p_distribution(top_k, top_p):
    logits = torch.randn(49152, generator=torch.Generator().manual_seed(top_k)) * 4
    p = SamplingParams(temperature=0.7, top_k=top_k, top_p=top_p)
    ids, probs = nucleus(logits, p)
    got = torch.zeros(49152, dtype=torch.float64).index_put_((ids,), probs.double())
    # reference: loraforge.generate.sample's filtering, with a full sort, in float64
    x = logits.double() / 0.7
    if top_k:
        x = x.masked_fill(x < torch.topk(x, top_k).values[-1], float("-inf"))
    sorted_x, order = x.sort(descending=True)
    pr = sorted_x.softmax(-1)
    pr = pr.masked_fill(pr.cumsum(-1) - pr > top_p, 0)
    want = torch.zeros(49152, dtype=torch.float64).index_put_((order,), pr / pr.sum())
    assert torch.equal(got > 0, want > 0)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)


def test_sample_row_draws_from_the_nucleus():
    logits = torch.full((1000,), -20.0)
    logits[[3, 500, 999]] = torch.tensor([2.0, 1.0, 0.0])
    p = SamplingParams(temperature=1.0, top_k=2)
    g = torch.Generator().manual_seed(0)
    draws = [sample_row(logits, p, g) for _ in range(3000)]
    assert set(draws) == {3, 500}  # top-k=2 never draws the third
    share = draws.count(3) / len(draws)
    assert abs(share - 1 / (1 + torch.e ** -1)) < 0.03  # e^2 / (e^2 + e^1)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_row(logits, p, g1) for _ in range(50)] == [sample_row(logits, p, g2) for _ in range(50)]


def test_engine_serves_adapters_on_an_nf4_base(tiny_folder, tmp_path):
    from loraforge.model import load_model

    model, tok = load_model(str(tiny_folder), quantize="nf4")
    dirs = make_adapters(model, tmp_path, names=["q0", "q1", "q2"])
    engine = Engine(model, tok, max_batch=4, max_len=64)
    for name, d in dirs.items():
        engine.load_adapter(name, d)
    prompts = prompts_for(tok, 4)
    adapters = ["q0", "q1", None, "q2"]
    sp = SamplingParams(max_new_tokens=8)
    alone = [engine.generate([p], sp, [a])[0].token_ids for p, a in zip(prompts, adapters, strict=True)]
    assert [c.token_ids for c in engine.generate(prompts, sp, adapters)] == alone
    assert len({tuple(engine.generate([prompts[0]], sp, [a])[0].token_ids) for a in adapters}) == 4


def test_min_tokens_holds_back_end_of_sequence(engine):
    p = prompts_for(engine.tokenizer, 1)[0]
    first = engine.generate([p], SamplingParams(max_new_tokens=6), ["a1"])[0].token_ids
    engine.eos = {first[0]}  # make the first greedy token an end-of-sequence token
    stopped = engine.generate([p], SamplingParams(max_new_tokens=6), ["a1"])[0]
    assert stopped.token_ids == [first[0]] and stopped.finish_reason == "stop"
    held = engine.generate([p], SamplingParams(max_new_tokens=6, min_tokens=3), ["a1"])[0]
    assert len(held.token_ids) >= 3 and first[0] not in held.token_ids[:3]
    with pytest.raises(LoraForgeError, match="min_tokens"):
        SamplingParams(max_new_tokens=2, min_tokens=3)


def test_batched_prefill_equals_each_prompt_alone(engine):
    """Right-padded prompts of different lengths and adapters in one prefill: each row's next-token logits
    and cached keys are the ones it gets alone."""
    from loraforge.serve.engine import GenerationRequest

    prompts = prompts_for(engine.tokenizer, 4)
    assert len({len(p) for p in prompts}) > 1
    reqs = [GenerationRequest(f"r{i}", p, SamplingParams(), a, slot=i)
            for i, (p, a) in enumerate(zip(prompts, [None, "a0", "a1", "a3"], strict=True))]
    together = engine._prefill(reqs)
    keys = [engine.cache.k[:, i, :, :len(p)].clone() for i, p in enumerate(prompts)]
    for i, r in enumerate(reqs):
        r.slot = 0
        alone = engine._prefill([r])
        torch.testing.assert_close(together[i], alone[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(keys[i], engine.cache.k[:, 0, :, :len(r.prompt_ids)], atol=1e-5, rtol=1e-5)
        assert engine.cache.lengths[0] == len(r.prompt_ids)


def test_prefill_groups_keep_padding_bounded():
    from loraforge.serve.engine import PREFILL_TOKENS, GenerationRequest, prefill_groups

    def reqs(*lengths):
        return [GenerationRequest(str(i), [1] * n, SamplingParams()) for i, n in enumerate(lengths)]

    sizes = lambda groups: [[len(r.prompt_ids) for r in g] for g in groups]  # noqa: E731
    assert sizes(prefill_groups(reqs(30, 35, 40, 32))) == [[30, 35, 40, 32]]
    # a long prompt does not make many short ones pad to its length: padded <= 2 x real + 64
    assert sizes(prefill_groups(reqs(10, 12, 900, 11, 9))) == [[10, 12], [900, 11], [9]]
    big = PREFILL_TOKENS // 2
    assert sizes(prefill_groups(reqs(big, big, big))) == [[big, big], [big]]
    assert prefill_groups([]) == []
