"""LoRA adapters in PEFT's format: PEFT reads ours, we read PEFT's, and mixed batches agree with PEFT's."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from conftest import randomize_adapter
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraforge.errors import LoraForgeError
from loraforge.lora import (
    LoraConfig,
    adapter_ids_for,
    add_lora,
    load_adapter,
    registry,
    save_adapter,
)

IDS = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))


def hf_model(folder):
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


small_random = functools.partial(randomize_adapter, std=0.05)


def peft_saved_adapter(folder, out, seed, r=4, targets=("q_proj", "v_proj", "down_proj"), rslora=False):
    torch.manual_seed(seed)
    cfg = PeftLoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0,
                         init_lora_weights=False, use_rslora=rslora, task_type="CAUSAL_LM")
    pm = get_peft_model(hf_model(folder), cfg)
    pm.save_pretrained(str(out))
    with torch.no_grad():
        return pm(IDS).logits


def test_ours_loaded_by_peft_gives_same_logits(tiny_folder, tiny, tmp_path):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=16, targets="all-linear", use_rslora=True))
    small_random(model, "a", 0)
    save_adapter(model, "a", tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    with torch.no_grad():
        ours = model(IDS)
        theirs = PeftModel.from_pretrained(hf_model(tiny_folder), str(tmp_path / "a")).eval()(IDS).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_saved_adapter_loaded_by_us(tiny_folder, tiny, tmp_path, rslora):
    theirs = peft_saved_adapter(tiny_folder, tmp_path / "p", seed=1, rslora=rslora)
    model, _ = tiny
    name = load_adapter(model, tmp_path / "p", "p")
    with torch.no_grad():
        ours = model(IDS)
    assert name == "p" and registry(model).active == "p"
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_mixed_batch_matches_peft_adapter_names(tiny_folder, tiny, tmp_path):
    for i, n in enumerate(["x", "y", "z"]):
        peft_saved_adapter(tiny_folder, tmp_path / n, seed=10 + i, r=2 + i,
                           targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    pm = PeftModel.from_pretrained(hf_model(tiny_folder), str(tmp_path / "x"), adapter_name="x")
    pm.load_adapter(str(tmp_path / "y"), adapter_name="y")
    pm.load_adapter(str(tmp_path / "z"), adapter_name="z")
    pm.eval()
    rows = ["y", "__base__", "x", "z"]
    ids = torch.randint(0, 49152, (4, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        theirs = pm(ids, adapter_names=rows).logits
    model, _ = tiny
    for n in ("x", "y", "z"):
        load_adapter(model, tmp_path / n, n)
    with torch.no_grad():
        ours = model(ids, adapter_ids=adapter_ids_for(model, [None if r == "__base__" else r for r in rows]))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_unknown_config_keys_warn(tiny_folder, tiny, tmp_path, caplog):
    peft_saved_adapter(tiny_folder, tmp_path / "p", seed=2)
    cfg = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    cfg["some_future_option"] = 3
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps(cfg))
    model, _ = tiny
    import logging

    with caplog.at_level(logging.WARNING, logger="loraforge"):
        load_adapter(model, tmp_path / "p")
    assert "some_future_option" in caplog.text


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_untouched(model, before):
    assert registry(model).names == []
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_adapter_for_another_model_is_refused(tiny, tmp_path, smol_folder):
    from conftest import make_tiny_folder

    other = make_tiny_folder(tmp_path / "other", smol_folder, seed=3, hidden_size=48, num_attention_heads=6,
                             intermediate_size=96)
    peft_saved_adapter(other, tmp_path / "p", seed=2)
    model, _ = tiny
    before = _state(model)
    with pytest.raises(LoraForgeError, match="made for another model"):
        load_adapter(model, tmp_path / "p")
    _assert_untouched(model, before)


def test_adapter_with_modules_the_model_lacks_is_refused(tiny_folder, tiny, tmp_path, smol_folder):
    from conftest import make_tiny_folder

    deeper = make_tiny_folder(tmp_path / "deep", smol_folder, seed=3, num_hidden_layers=3)
    peft_saved_adapter(deeper, tmp_path / "p", seed=2)
    model, _ = tiny
    before = _state(model)
    with pytest.raises(LoraForgeError, match="model.layers.2"):
        load_adapter(model, tmp_path / "p")
    _assert_untouched(model, before)


def test_corrupt_safetensors_is_refused(tiny_folder, tiny, tmp_path):
    peft_saved_adapter(tiny_folder, tmp_path / "p", seed=2)
    f = tmp_path / "p" / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    model, _ = tiny
    before = _state(model)
    with pytest.raises(LoraForgeError, match="corrupt"):
        load_adapter(model, tmp_path / "p")
    _assert_untouched(model, before)


def test_pickle_only_adapter_is_refused(tiny_folder, tiny, tmp_path):
    peft_saved_adapter(tiny_folder, tmp_path / "p", seed=2)
    (tmp_path / "p" / "adapter_model.safetensors").unlink()
    (tmp_path / "p" / "adapter_model.bin").write_bytes(b"\x80\x04pickle that must never be loaded")
    model, _ = tiny
    before = _state(model)
    with pytest.raises(LoraForgeError, match="pickle"):
        load_adapter(model, tmp_path / "p")
    _assert_untouched(model, before)


def test_save_is_atomic_on_failure(tiny, tmp_path, monkeypatch):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=2))
    save_adapter(model, "a", tmp_path / "a")
    good = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    import loraforge.lora.peft_io as peft_io

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(peft_io, "atomic_write_json", boom)
    small_random(model, "a", 1)
    with pytest.raises(OSError):
        save_adapter(model, "a", tmp_path / "a")
    assert (tmp_path / "a" / "adapter_model.safetensors").read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
