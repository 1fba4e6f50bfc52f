"""One tenant cannot corrupt another: a non-finite adapter's rows never reach another row's output, even
through a reused KV-cache slot, and adapter names cannot collide with a module's own attributes."""

from __future__ import annotations

import pytest
import torch
from test_engine import NAMES, engine  # noqa: F401 - the engine fixture (tiny model, adapters a0..a3)

from loraforge.errors import LoraForgeError
from loraforge.generate import SamplingParams, generate_ids
from loraforge.lora import LoraConfig, add_lora, delete_adapter, get_adapter_params, registry, set_adapter
from loraforge.prefix import PrefixConfig, add_prefix, save_prefix_adapter
from loraforge.serve import ServeError

pytestmark = pytest.mark.usefixtures("one_thread")


def poison(model, name: str) -> None:
    """NaN in every tensor of a loaded adapter (as if load-time validation had been bypassed)."""
    with torch.no_grad():
        for p in get_adapter_params(model, name).values():
            p.fill_(float("nan"))


def test_a_nan_adapter_never_reaches_another_row_or_a_reused_slot(engine):  # noqa: F811
    poison(engine.model, "a1")
    tok = engine.tokenizer
    long = tok("one two three four five six seven eight nine ten " * 3)["input_ids"]  # ~30 tokens
    mid = tok("the quick brown fox jumps over the lazy dog and then " * 2)["input_ids"]
    short = tok("hi")["input_ids"]
    few, many = SamplingParams(max_new_tokens=2), SamplingParams(max_new_tokens=12)
    alone = {name: engine.generate([p], many, [a])[0].token_ids
             for name, p, a in [("mid", mid, None), ("short", short, "a0"), ("long", long, None)]}
    # The NaN row (slot 0, longest prompt) leaves after 2 tokens; the short row moves into its slot while
    # the mid row keeps the batch's key span past the short row's own positions.
    got = engine.generate([long, mid, short], [few, many, many], ["a1", None, "a0"])
    assert got[1].token_ids == alone["mid"]
    assert got[2].token_ids == alone["short"]
    # Later requests take the slots the NaN row wrote into: still their solo outputs.
    again = engine.generate([short, long], [many, many], ["a0", None])
    assert [c.token_ids for c in again] == [alone["short"], alone["long"]]
    # the NaN adapter really was poisoned (its own row is junk)
    assert engine.generate([long], few, ["a1"])[0].token_ids != engine.generate([long], few, [None])[0].token_ids


BAD_NAMES = ["_parameters", "forward", "keys", "to", "__class__", "", "a.b", "a/b", "x" * 65, "-x", "with space"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_adapter_names_that_could_break_a_module_are_refused(engine, name):  # noqa: F811
    model = engine.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoraForgeError, match="letters, digits, '-' or '_'"):
        add_lora(model, name, LoraConfig(r=2))
    with pytest.raises(LoraForgeError, match="letters, digits, '-' or '_'"):
        engine.load_adapter(name, engine.dirs["a0"])
    assert model.state_dict().keys() == before.keys() and name not in registry(model).configs
    # loading, using and unloading keep working afterwards
    add_lora(model, "fine_name-2", LoraConfig(r=2), activate=False)
    delete_adapter(model, "fine_name-2")
    engine.load_adapter("again", engine.dirs["a0"])
    assert engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=2), ["again"])[0].token_ids
    engine.unload_adapter("again")
    assert sorted(engine.adapters) == NAMES


def make_prefix_adapter(model, out, name: str = "pre", P: int = 3):
    """A saved prefix-tuning folder with random (non-trivial) keys and values; the model is left bare."""
    torch.manual_seed(7)
    add_prefix(model, name, PrefixConfig(num_virtual_tokens=P, init="normal"), activate=False)
    path = save_prefix_adapter(model, name, out / name)
    delete_adapter(model, name)
    return path


def test_prefix_adapters_are_served_beside_lora_rows(engine, tmp_path):  # noqa: F811
    model, tok = engine.model, engine.tokenizer
    engine.load_adapter("pre", make_prefix_adapter(model, tmp_path))
    prompts = [tok(w)["input_ids"] for w in ["the cat sat", "hello", "numbers: 1 2 3 4 5 6 7", "why", "a b"]]
    adapters = [None, "pre", "a0", "pre", "a2"]
    sp = SamplingParams(max_new_tokens=10)
    got = [c.token_ids for c in engine.generate(prompts, sp, adapters)]
    for p, a, g in zip(prompts, adapters, got, strict=True):  # each row equals the one-adapter reference
        set_adapter(model, a)
        assert g == generate_ids(model, [p], sp, engine.eos)[0], a
    set_adapter(model, None)
    assert got[1] != engine.generate([prompts[1]], sp, [None])[0].token_ids  # the prefix acts
    # the context limit counts the prefix's positions
    n = engine.max_len - len(prompts[1]) - 1
    engine.generate([prompts[1]], SamplingParams(max_new_tokens=n), [None])
    with pytest.raises(ServeError, match="for the adapter's prefix"):
        engine.add_request(prompts[1], SamplingParams(max_new_tokens=n), "pre")
    engine.unload_adapter("pre")
    assert sorted(engine.adapters) == NAMES


def test_a_nan_row_fails_alone_when_sampling(engine):  # noqa: F811
    """Sampled (not greedy) rows: NaN logits would break the sampler, and so the whole batch."""
    poison(engine.model, "a1")
    prompts = [engine.tokenizer(w)["input_ids"] for w in ["the cat", "hello there", "why"]]
    sp = SamplingParams(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3)
    alone = [engine.generate([p], sp, [a])[0] for p, a in [(prompts[0], None), (prompts[2], "a0")]]
    got = engine.generate(prompts, sp, [None, "a1", "a0"])
    assert got[1].finish_reason == "error" and got[1].token_ids == []
    assert [got[0].token_ids, got[2].token_ids] == [c.token_ids for c in alone]
    assert engine.metrics.snapshot()["requests_failed"] == 1
    assert not engine.has_unfinished() and not engine.adapter_busy("a1")
