"""Bad adapters are refused at load with one sentence naming the file and field, and leave the model as it was.

Each case starts from a good adapter saved by us on the tiny Llama and breaks one thing in it: non-finite
weights or scalings (JSON's Infinity / NaN literals included), absurd or zero ranks, bad regexes, a path
too long for the file system. LoRA configs built from Python get the same checks.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import randomize_adapter
from safetensors.torch import load_file, save_file

from loraforge.adapters import attach_adapter
from loraforge.errors import LoraForgeError
from loraforge.lora import LoraConfig, add_lora, delete_adapter, load_adapter, registry, save_adapter
from loraforge.model import load_model
from loraforge.prefix import PrefixConfig, add_prefix, save_prefix_adapter

Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_folder):
    """A good LoRA adapter and a good prefix adapter for the tiny model, saved once."""
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    out = tmp_path_factory.mktemp("adapters")
    add_lora(model, "lora", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]))
    randomize_adapter(model, "lora", std=0.1)
    add_prefix(model, "prefix", PrefixConfig(num_virtual_tokens=2, init="normal"))
    return save_adapter(model, "lora", out / "lora"), save_prefix_adapter(model, "prefix", out / "prefix")


def copy(src, tmp_path, name="bad"):
    return shutil.copytree(src, tmp_path / name)


def edit_config(folder, **changes):
    """Rewrite adapter_config.json as Python's json writes it: inf and nan become Infinity and NaN."""
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))
    return folder


def edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return folder


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, list(registry(model).names)


def assert_untouched(model, before):
    state, names = before
    after = model.state_dict()
    assert list(registry(model).names) == names and registry(model).active is None
    assert after.keys() == state.keys(), "modules were wrapped or tensors added"
    assert all(torch.equal(after[k], state[k]) for k in state)


def refused(model, folder, match, load=attach_adapter):
    before = snapshot(model)
    with pytest.raises(LoraForgeError, match=match) as e:
        load(model, folder)
    assert "\n" not in str(e.value)
    assert_untouched(model, before)
    return str(e.value)


def _set(key, value):
    def fn(tensors):
        tensors[key] = torch.full_like(tensors[key], value) if not isinstance(value, torch.Tensor) else value
    return fn


# -- item 1: non-finite adapters ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_lora_weights_are_refused(saved, tiny, tmp_path, value):
    bad = edit_tensors(copy(saved[0], tmp_path), _set(f"{Q}.lora_B.weight", value))
    model, _ = tiny
    msg = refused(model, bad, "NaN or infinite")
    assert "adapter_model.safetensors" in msg and "q_proj.lora_B" in msg
    refused(model, bad, "NaN or infinite", load=load_adapter)


@pytest.mark.parametrize("changes, field", [
    ({"lora_alpha": float("inf")}, "lora_alpha"),
    ({"lora_alpha": float("nan")}, "lora_alpha"),
    ({"alpha_pattern": {".*": "nan"}}, "alpha_pattern"),
    ({"alpha_pattern": {".*": float("nan")}}, "alpha_pattern"),
    ({"alpha_pattern": {"q_proj": float("-inf")}}, "alpha_pattern"),
    ({"lora_dropout": float("nan")}, "lora_dropout"),
])
def test_non_finite_config_values_are_refused(saved, tiny, tmp_path, changes, field):
    bad = edit_config(copy(saved[0], tmp_path), **changes)
    model, _ = tiny
    msg = refused(model, bad, field)
    assert "adapter_config.json" in msg


def test_finite_alpha_whose_update_overflows_is_refused(saved, tiny, tmp_path):
    # alpha = 1e300 is a finite number, but s * B @ A is inf in float32: every output would be NaN
    bad = edit_config(copy(saved[0], tmp_path), lora_alpha=1e300)
    model, _ = tiny
    msg = refused(model, bad, "beyond what torch.float32 holds")
    assert "q_proj" in msg or "v_proj" in msg or "down_proj" in msg


def test_lora_weights_beyond_fp16_are_refused(saved, tiny_folder, tmp_path):
    bad = edit_tensors(copy(saved[0], tmp_path), _set(f"{Q}.lora_A.weight", 1e5))  # finite in fp32, inf in fp16
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float16")
    refused(model, bad, "beyond what torch.float16 holds")


def test_non_finite_prefix_is_refused(saved, tiny, tmp_path):
    bad = edit_tensors(copy(saved[1], tmp_path), _set("prompt_embeddings", float("nan")))
    model, _ = tiny
    refused(model, bad, "prompt_embeddings")


def test_prefix_beyond_fp16_is_refused(saved, tiny_folder, tmp_path):
    bad = edit_tensors(copy(saved[1], tmp_path), _set("prompt_embeddings", 1e6))  # finite in fp32, inf in fp16
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float16")
    refused(model, bad, "beyond what this model's torch.float16 holds")


def test_generate_cli_refuses_a_nan_adapter_in_one_line(saved, tiny_folder, tmp_path):
    from test_cli import cli

    bad = edit_tensors(copy(saved[0], tmp_path), _set(f"{Q}.lora_A.weight", float("nan")))
    r = cli("generate", "--model", str(tiny_folder), "--adapter", str(bad), "--prompt", "hi",
            "--max-new-tokens", "2", check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "NaN or infinite" in r.stderr.strip().splitlines()[-1]


# -- item 4: malformed configs and tensors --------------------------------------------------------------------


@pytest.mark.parametrize("changes, match", [
    ({"r": 1e999}, "rank r must be a positive integer, got inf"),
    ({"r": 10**12}, r"rank 1000000000000 for model\.layers\.\d\.\w+\.\w+ is outside 1\.\.\d+"),
    ({"r": 0}, "rank r must be a positive integer"),
    ({"r": "4"}, "rank r must be a positive integer"),
    ({"rank_pattern": {"q_proj(": 4}}, r"rank_pattern: 'q_proj\(' is not a valid regex"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
    ({"rank_pattern": {"q_proj": 10**12}}, "outside 1..32"),
    ({"alpha_pattern": {"[": 4}}, "alpha_pattern: '\\[' is not a valid regex"),
    ({"lora_alpha": 0}, "lora_alpha must be a positive finite number"),
    ({"target_modules": 7}, "target_modules"),
    ({"use_rslora": "yes"}, "use_rslora"),
    ({"use_dora": True}, "use_dora=True"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
])
def test_malformed_config_is_refused_before_touching_the_model(saved, tiny, tmp_path, changes, match):
    bad = edit_config(copy(saved[0], tmp_path), **changes)
    model, _ = tiny
    msg = refused(model, bad, match)
    assert "adapter_config.json" in msg or "adapter_model.safetensors" in msg


def test_zero_rank_tensors_are_refused(saved, tiny, tmp_path):
    def zero_rank(tensors):
        for k in list(tensors):
            t = tensors[k]
            tensors[k] = t[:0] if k.endswith("lora_A.weight") else t[:, :0]
    bad = edit_tensors(copy(saved[0], tmp_path), zero_rank)
    model, _ = tiny
    refused(model, bad, "rank 0 for model.layers")


def test_rank_above_the_layer_is_refused(saved, tiny, tmp_path):
    # v_proj is 32 -> 16: rank 17 is more than B @ A can use; the file is otherwise consistent
    def rank17(tensors):
        g = torch.Generator().manual_seed(0)
        for k in list(tensors):
            if ".v_proj." in k:
                shape = (17, 32) if "lora_A" in k else (16, 17)
                tensors[k] = torch.randn(shape, generator=g) * 0.01
    bad = edit_tensors(copy(saved[0], tmp_path), rank17)
    model, _ = tiny
    refused(model, bad, r"rank 17 for model\.layers\.\d\.self_attn\.v_proj is outside 1\.\.16")


def test_integer_tensors_are_refused(saved, tiny, tmp_path):
    bad = edit_tensors(copy(saved[0], tmp_path), lambda t: t.update({f"{Q}.lora_A.weight": torch.ones(4, 32,
                                                                                              dtype=torch.int32)}))
    model, _ = tiny
    refused(model, bad, "not floating point")


def test_a_very_long_path_is_one_sentence(tiny, tmp_path):
    model, _ = tiny
    for path in ("a" * 5000, str(tmp_path / "/".join(["d"] * 2500))):
        msg = refused(model, path, "cannot read this adapter folder")
        assert len(msg) < 400


def test_a_good_adapter_still_loads_after_refusals(saved, tiny, tmp_path):
    model, _ = tiny
    bad = edit_config(copy(saved[0], tmp_path), rank_pattern={"q_proj": 0})
    refused(model, bad, "rank_pattern")
    assert attach_adapter(model, saved[0], "ok") == "ok" and registry(model).active == "ok"


# -- the same checks for configs built in Python ----------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"r": float("inf")}, "rank r"),
    ({"r": True}, "rank r"),
    ({"alpha": float("inf")}, "alpha must be a positive finite number"),
    ({"alpha": float("nan")}, "alpha"),
    ({"dropout": float("nan")}, "dropout"),
    ({"dropout": "0.1"}, "dropout"),
    ({"use_rslora": 1}, "use_rslora"),
    ({"targets": 3}, "targets"),
    ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]"),
    ({"rank_pattern": {"(": 2}}, "rank_pattern: '\\(' is not a valid regex"),
    ({"rank_pattern": ["q_proj"]}, "rank_pattern must be a mapping"),
    ({"alpha_pattern": {"q_proj": float("nan")}}, r"alpha_pattern\['q_proj'\]"),
])
def test_lora_config_validates_every_field(kw, match):
    with pytest.raises(LoraForgeError, match=match):
        LoraConfig(**kw)


@pytest.mark.parametrize("cfg, match", [
    (LoraConfig(r=10**12), "rank 1000000000000 for model.layers.0.self_attn.q_proj is outside 1..32"),
    (LoraConfig(r=4, rank_pattern={"v_proj": 17}), r"rank 17 for model\.layers\.0\.self_attn\.v_proj is outside 1\.\.16"),
])
def test_add_lora_bounds_rank_by_the_layer_before_wrapping(tiny, cfg, match):
    model, _ = tiny
    before = snapshot(model)
    with pytest.raises(LoraForgeError, match=match):
        add_lora(model, "a", cfg)
    assert_untouched(model, before)
    add_lora(model, "a", LoraConfig(r=16))  # min(in, out) of k_proj / v_proj is exactly 16
    delete_adapter(model, "a")


# -- adapter_config keys PEFT writes ------------------------------------------------------------------------------


def test_adapter_saved_by_peft_loads_without_warnings(tiny_folder, tiny, tmp_path, caplog):
    import logging

    from test_peft_parity import peft_saved_adapter

    peft_saved_adapter(tiny_folder, tmp_path / "p", seed=2)
    raw = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert "kasa_config" in raw or len(raw) > 30  # PEFT 0.21 writes every option it has, mostly null
    model, _ = tiny
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        load_adapter(model, tmp_path / "p")
    assert [r.getMessage() for r in caplog.records if r.name == "loraforge"] == []
    # an option we do not know, set to something, still warns, naming its value
    edit_config(tmp_path / "p", kasa_config={"k": 2}, future_flag=None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        load_adapter(model, tmp_path / "p", "again")
    assert "kasa_config={'k': 2}" in caplog.text and "future_flag" not in caplog.text


def test_dora_saved_by_peft_is_refused_not_ignored(tiny_folder, tiny, tmp_path):
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from test_peft_parity import hf_model

    pm = get_peft_model(hf_model(tiny_folder), PeftLoraConfig(r=4, target_modules=["q_proj"], use_dora=True,
                                                              task_type="CAUSAL_LM"))
    pm.save_pretrained(str(tmp_path / "dora"))
    model, _ = tiny
    msg = refused(model, tmp_path / "dora", r"use_dora=True \(DoRA")
    assert "adapter_config.json" in msg


def test_server_engine_refuses_a_nan_adapter_and_serves_on(saved, tiny, tmp_path):
    """The server's load endpoint goes through Engine.load_adapter: the same refusal, the model unchanged."""
    from loraforge.serve.engine import Engine

    model, tok = tiny
    engine = Engine(model, tok, max_batch=2, max_len=32)
    bad = edit_config(copy(saved[0], tmp_path), alpha_pattern={".*": float("nan")})
    before = snapshot(model)
    with pytest.raises(LoraForgeError, match="alpha_pattern"):
        engine.load_adapter("bad", bad)
    assert_untouched(model, before)
    assert engine.adapters == {}
    engine.load_adapter("good", saved[0])
    assert engine.adapters == {"good": str(saved[0])}
