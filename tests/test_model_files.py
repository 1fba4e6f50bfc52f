"""Model folders with broken side files, configs too big to load, and the base model name adapters record."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

from loraforge.errors import LoraForgeError
from loraforge.lora import LoraConfig, add_lora, load_adapter, registry, save_adapter
from loraforge.model import count_parameters, load_model, resolve_source
from loraforge.model.budget import SKIP_ENV, check_fits, weight_bytes
from loraforge.model.config import ModelConfig


@pytest.fixture()
def folder(tiny_folder, tmp_path):
    """A copy of the tiny model's folder to break."""
    return shutil.copytree(tiny_folder, tmp_path / "model")


def edit_json(path, value):
    path.write_text(value if isinstance(value, str) else json.dumps(value))


def one_sentence(fn, match):
    with pytest.raises(LoraForgeError, match=match) as e:
        fn()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_config_json_that_is_not_an_object(folder):
    edit_json(folder / "config.json", [])
    msg = one_sentence(lambda: load_model(str(folder), device="cpu"), "must be a JSON object, not list")
    assert "config.json" in msg


def test_config_json_with_an_infinite_size(folder):
    cfg = json.loads((folder / "config.json").read_text())
    edit_json(folder / "config.json", json.dumps({**cfg, "hidden_size": 1e999}))  # written as Infinity
    one_sentence(lambda: load_model(str(folder), device="cpu"), "config.json: .*not a finite number")


@pytest.mark.parametrize("weight_map, match", [
    ([["model.embed_tokens.weight", "model.safetensors"]], "weight_map must be a non-empty object"),
    ({}, "weight_map must be a non-empty object"),
    ({"model.norm.weight": 7}, r"weight_map\['model.norm.weight'\] must be a file name"),
    ({"model.norm.weight": "../../elsewhere.safetensors"}, "must be a file name inside the folder"),
])
def test_shard_index_with_a_bad_weight_map(folder, weight_map, match):
    edit_json(folder / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    msg = one_sentence(lambda: load_model(str(folder), device="cpu"), match)
    assert "model.safetensors.index.json" in msg


@pytest.mark.parametrize("garbage", ["{not json", "[]", json.dumps({"name": ["x"]})])
def test_garbled_loraforge_source_json_is_reported_and_ignored(folder, garbage, caplog):
    edit_json(folder / "loraforge_source.json", garbage)
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        model, _ = load_model(str(folder), device="cpu")
    assert model.name_or_path == "model"  # the folder's name, as without the file
    warned = [r.getMessage() for r in caplog.records if r.name == "loraforge"]
    assert len(warned) == 1 and "loraforge_source.json" in warned[0] and "ignoring" in warned[0]


# -- a model that cannot fit ------------------------------------------------------------------------------------


def test_a_config_too_big_for_memory_is_refused_before_building_anything(folder):
    cfg = json.loads((folder / "config.json").read_text())
    edit_json(folder / "config.json", {**cfg, "num_hidden_layers": 10**7})  # ~370 GB of fp32 weights
    msg = one_sentence(lambda: load_model(str(folder), device="cpu", dtype="float32"),
                       r"needs about [\d,.]+ [GP]iB for its weights alone .* but cpu has [\d,.]+ GiB free")
    assert "10000000 layers" in msg and "config.json" in msg


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True}, {"attention_bias": True, "mlp_bias": True},
                                       {"model_type": "qwen2"}])
def test_weight_estimate_equals_the_built_model(tiny_folder, tmp_path, smol_folder, overrides):
    """The estimate is exact for fp32 (parameters x 4 bytes), whatever the biases and tying."""
    from conftest import make_tiny_folder

    folder = tiny_folder
    if overrides:
        folder = make_tiny_folder(tmp_path / "m", smol_folder, **{k: v for k, v in overrides.items()
                                                                  if k != "model_type"})
        if "model_type" in overrides:
            cfg = json.loads((folder / "config.json").read_text())
            cfg.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])
            cfg = ModelConfig.from_hf(cfg)
        else:
            cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    else:
        cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    from loraforge.model.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model.tie_weights()
    assert weight_bytes(cfg, torch.float32) == 4 * count_parameters(model)
    assert weight_bytes(cfg, torch.bfloat16) == 2 * count_parameters(model)


@pytest.mark.parametrize(("family", "overrides"), [
    ("gemma2", {}), ("phi3", {}), ("mixtral", {}), ("qwen3_moe", {"num_hidden_layers": 3, "mlp_only_layers": [1]}),
])
def test_weight_estimate_is_exact_for_other_families(tmp_path, smol_folder, family, overrides):
    """Sandwich norms, fused projections, experts and routers, dense layers of a MoE model: fp32 estimate ==
    parameters x 4 bytes; the NF4 estimate bounds what the quantized model holds (experts quantized too; the
    fixed tables per quantized weight make it loose at this tiny size)."""
    from test_families import build

    build(family, tmp_path / "m", smol_folder, **overrides)
    cfg = ModelConfig.from_hf(json.loads((tmp_path / "m" / "config.json").read_text()))
    model, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert weight_bytes(cfg, torch.float32) == 4 * count_parameters(model)
    model, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32", quantize="nf4")
    held = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    held = sum(v for k, v in held.items() if k not in (id(model.inv_freq),))
    assert held <= weight_bytes(cfg, torch.float32, "nf4")


@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_quantized_weight_estimate_bounds_the_loaded_model(tiny_folder, quant):
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize=quant)
    held = {id(t): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    held.pop(id(model.inv_freq), None)
    estimate = weight_bytes(model.config, torch.float32, quant)
    assert sum(held.values()) <= estimate <= 1.02 * sum(held.values())


def test_memory_check_can_be_skipped(tiny_folder, monkeypatch):
    cfg = ModelConfig.from_hf({**json.loads((tiny_folder / "config.json").read_text()), "num_hidden_layers": 10**7})
    with pytest.raises(LoraForgeError, match="needs about"):
        check_fits(cfg, torch.float32, None, torch.device("cpu"), "config.json")
    monkeypatch.setenv(SKIP_ENV, "1")
    check_fits(cfg, torch.float32, None, torch.device("cpu"), "config.json")


# -- base_model_name_or_path ------------------------------------------------------------------------------------


def test_embedded_model_is_named_by_its_hub_id(smol_folder):
    source = resolve_source(None)
    assert source.base_id == "HuggingFaceTB/SmolLM2-135M-Instruct" and source.name == "SmolLM2-135M-Instruct"
    # its converted folder passed by path is the same model
    assert resolve_source(str(smol_folder)).base_id == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_adapter_of_a_folder_names_its_absolute_path_and_peft_auto_loads_it(tiny_folder, tiny, tmp_path,
                                                                             monkeypatch):
    from conftest import randomize_adapter
    from peft import AutoPeftModelForCausalLM

    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapter(model, "a", std=0.05)
    out = save_adapter(model, "a", tmp_path / "a")
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["base_model_name_or_path"] == str(tiny_folder.resolve())
    monkeypatch.chdir(tmp_path)  # PEFT resolves the base from the adapter alone, wherever we are
    ids = torch.randint(0, 49152, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = AutoPeftModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
        ours = model(ids)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("base", ["SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "/gone/folder",
                                  None])
def test_adapters_load_whatever_base_name_they_record(tiny_folder, tiny, tmp_path, base):
    """The base is matched by the tensors' shapes, never by this name (older adapters wrote the short name)."""
    model, _ = tiny
    add_lora(model, "src", LoraConfig(r=2, targets=["q_proj"]))
    out = save_adapter(model, "src", tmp_path / "a", base_model_name=base)
    raw = json.loads((out / "adapter_config.json").read_text())
    raw["base_model_name_or_path"] = base
    (out / "adapter_config.json").write_text(json.dumps(raw))
    assert load_adapter(model, out, "b") == "b" and "b" in registry(model).names


@pytest.mark.parametrize("blocksize", [1e999, "64", 64.5])
def test_quantization_config_with_a_bad_blocksize(blocksize):
    from loraforge.quant.checkpoint import spec_from_config

    with pytest.raises(LoraForgeError, match="config.json: quantization_config: blocksize must be an integer"):
        spec_from_config({"quantization_config": {"quant_method": "loraforge", "quant_type": "int8",
                                                  "blocksize": blocksize}}, "config.json")


def test_a_very_long_model_path_is_one_sentence(tmp_path):
    for path in ("m" * 5000, str(tmp_path / "/".join(["d"] * 2500))):
        msg = one_sentence(lambda p=path: resolve_source(p), "cannot read")
        assert len(msg) < 400
