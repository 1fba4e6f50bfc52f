"""ModelConfig per family: fields read and validated, unimplemented maths refused by name, GGUF families
checked before conversion, NF4 codes of every family's projections equal to bitsandbytes'."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_families import BASE, FAMILIES, MOE, build

from loraforge.errors import LoraForgeError
from loraforge.model import ModelConfig, load_model
from loraforge.quant import QuantLinear


def hf_dict(family: str, **overrides) -> dict:
    from transformers import AutoConfig

    return AutoConfig.for_model(family, **{**BASE, **FAMILIES[family], **overrides}).to_dict()


def test_family_fields():
    g2 = ModelConfig.from_hf(hf_dict("gemma2"))
    assert (g2.norm_placement, g2.norm_unit_offset, g2.embed_scale, g2.mlp_kind) == ("sandwich", True, True, "geglu_tanh")
    assert (g2.attn_softcap, g2.final_softcap, g2.attn_scale) == (2.0, 3.0, 12 ** -0.5)
    assert g2.layer_windows == [6, None]  # transformers' default alternation: even layers slide
    g3 = ModelConfig.from_hf(hf_dict("gemma3_text"))
    assert g3.qk_norm == "head" and g3.rope_local.theta == 100.0 and g3.rope_scaling["rope_type"] == "linear"
    assert ModelConfig.from_hf(hf_dict("olmo2")).qk_norm == "proj"
    # Gemma's released configs say "gelu", which transformers reads as the tanh approximation
    assert ModelConfig.from_hf({**hf_dict("gemma"), "hidden_act": "gelu"}).mlp_kind == "geglu_tanh"
    assert ModelConfig.from_hf(hf_dict("mistral")).layer_windows == [6, 6]
    assert ModelConfig.from_hf(hf_dict("qwen2")).layer_windows == [None, 6]  # max_window_layers=1
    phi3 = ModelConfig.from_hf(hf_dict("phi3"))
    assert phi3.fused_qkv and phi3.fused_gate_up
    mix, q3m = ModelConfig.from_hf(hf_dict("mixtral")), ModelConfig.from_hf(hf_dict("qwen3_moe"))
    assert (mix.num_experts, mix.experts_per_token, mix.moe_renormalize) == (4, 2, True)
    assert (q3m.num_experts, q3m.moe_intermediate_size, q3m.moe_renormalize) == (4, 16, False)


def test_legacy_top_level_rope_keys_are_read():
    """Hub configs written before transformers 5 keep rope_theta / rope_scaling at the top level."""
    raw = {**BASE, "model_type": "llama", "rope_theta": 500000.0,
           "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    cfg = ModelConfig.from_hf(raw)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 4.0


@pytest.mark.parametrize(("family", "field", "value", "named"), [
    ("llama", "attention_dropout", 0.1, "attention_dropout"),
    ("mixtral", "router_jitter_noise", 0.1, "router_jitter_noise"),
    ("mixtral", "output_router_logits", True, "output_router_logits"),
    ("phi3", "resid_pdrop", 0.1, "resid_pdrop"),
    ("gemma2", "use_bidirectional_attention", True, "use_bidirectional_attention"),
    ("llama", "hidden_act", "relu", "hidden_act"),
    ("llama", "rope_parameters", {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, "rope_type"),
    ("phi3", "rope_parameters", {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5},
     "partial_rotary_factor"),
])
def test_unimplemented_maths_is_refused_by_name(family, field, value, named):
    raw = {**hf_dict(family), field: value}
    with pytest.raises(LoraForgeError) as e:
        ModelConfig.from_hf(raw, "m/config.json")
    msg = str(e.value)
    assert msg.startswith("m/config.json: ") and named in msg and "\n" not in msg


def test_unknown_family_is_refused(tmp_path):
    with pytest.raises(LoraForgeError, match="unsupported architecture 'FalconForCausalLM'.*supports: llama"):
        ModelConfig.from_hf({"model_type": "falcon", "architectures": ["FalconForCausalLM"]}, "x/config.json")


def write_gguf(path, arch: str, **fields) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(str(path), arch)
    for key, value in fields.items():
        w.add_uint32(key, value)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize(("arch", "fields", "named"), [
    ("falcon", {}, "'falcon'"),
    ("qwen2moe", {}, "'qwen2moe'"),
])
def test_gguf_of_unsupported_family_is_refused_before_conversion(tmp_path, monkeypatch, arch, fields, named):
    from loraforge.model import resolve_source

    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path / "home"))
    path = tmp_path / "m.gguf"
    write_gguf(path, arch, **fields)
    with pytest.raises(LoraForgeError, match=f"GGUF architecture {named} is not supported"):
        resolve_source(str(path))
    assert not (tmp_path / "home").exists()  # nothing converted, nothing written


@pytest.fixture(autouse=True)
def _eager_bnb():
    with torch._dynamo.config.patch(disable=True):  # see test_quant_bnb.py
        yield


@pytest.mark.parametrize("family", list(FAMILIES))
def test_qlora_nf4_codes_equal_bitsandbytes_and_forward_equals_dequantized(tmp_path, smol_folder, family):
    """Each quantized projection (Phi-3's fused qkv_proj [64, 32] and gate_up_proj [96, 32], each MoE
    expert's [32, 32] gate_up and [32, 16] down among them) holds bitsandbytes' codes for the checkpoint's
    weight, the router of a MoE model stays dense, and a LoRA adapter on the NF4 base gives the logits of
    the same adapter on the dequantized weights."""
    from bitsandbytes.functional import quantize_4bit
    from conftest import randomize_adapter
    from safetensors.torch import load_file

    from loraforge.lora import LoraConfig, add_lora

    build(family, tmp_path / "m", smol_folder)
    stored = load_file(str(tmp_path / "m" / "model.safetensors"))
    model, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32", quantize="nf4")
    ref, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert quantized and "lm_head" not in quantized
    for name, m in quantized.items():
        if ".experts." in name:  # ...experts.gate_up_proj.3: expert 3 of the stacked [E, out, in] parameter
            path, e = name.rsplit(".", 1)
            weight = ref.get_parameter(path)[int(e)]
        else:
            weight = ref.get_submodule(name).weight
            assert torch.equal(weight, stored[f"{name}.weight"])
        packed, qs = quantize_4bit(weight.detach(), blocksize=64, compress_statistics=True, quant_type="nf4")
        ours = m.quant_state
        assert torch.equal(ours.data, packed) and torch.equal(ours.absmax, qs.absmax), name
        assert torch.equal(ours.nested_absmax, qs.state2.absmax) and torch.equal(ours.offset, qs.offset), name
        with torch.no_grad():
            weight.copy_(m.dequantize(torch.float32))
    if family in MOE:
        assert sum(".experts." in n for n in quantized) == 2 * 4 * BASE["num_hidden_layers"]
        assert not any(n.endswith("mlp.gate") for n in quantized)
        assert model.model.layers[0].mlp.gate.weight.dtype == torch.float32
    for m in (model, ref):
        add_lora(m, "q", LoraConfig(r=4, alpha=8, dropout=0.0))
        randomize_adapter(m, "q", seed=1)
    x = torch.randint(3, BASE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-4)


def test_saved_config_round_trips(tmp_path, smol_folder):
    build("gemma2", tmp_path / "m", smol_folder)
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert ModelConfig.from_hf(raw).layer_windows == ModelConfig.from_hf(hf_dict("gemma2")).layer_windows


def test_peft_adapter_on_moe_router_is_refused_by_name(tmp_path, smol_folder):
    """PEFT's all-linear on a MoE model adapts the router (and the experts) through target_parameters; a
    changed router would send tokens to other experts, so loraforge refuses it (the experts it reads:
    tests/test_moe_lora.py)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from loraforge.lora import load_adapter

    hf = build("mixtral", tmp_path / "m", smol_folder)
    get_peft_model(hf, PeftLoraConfig(r=2, target_modules="all-linear")).save_pretrained(str(tmp_path / "a"))
    model, _ = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    with pytest.raises(LoraForgeError, match=r"adapter_config.json: target_parameters: 'gate.weight' is the MoE router"):
        load_adapter(model, tmp_path / "a")
    assert not any("lora" in k for k in model.state_dict())  # the model is untouched


@pytest.mark.parametrize(("family", "method"), [("qwen3_moe", "qlora")])
def test_cli_trains_and_generates(tmp_path, smol_folder, family, method):
    """`loraforge train` then `loraforge generate --adapter`, as a user would: QLoRA on a MoE model (experts
    quantized, q/k norms). Two subprocesses, so one family; the API tests cover the rest."""
    import os
    import subprocess
    import sys

    build(family, tmp_path / "m", smol_folder, vocab_size=49152)  # the real tokenizer's ids
    with open(tmp_path / "d.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"Item {i}?"},
                                             {"role": "assistant", "content": f"Item {i} is red."}]}) + "\n")

    def cli(*args):
        r = subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout

    cli("train", str(tmp_path / "d.jsonl"), "--model", str(tmp_path / "m"), "--method", method, "--out",
        str(tmp_path / "run"), "--max-steps", "2", "--batch-size", "4", "--rank", "4", "--device", "cpu",
        "--dtype", "float32", "--eval-every", "0", "--no-progress")
    adapter = tmp_path / "run"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    out = cli("generate", "--model", str(tmp_path / "m"), "--adapter", str(adapter), "--prompt", "Item 3?",
              "--max-new-tokens", "4", "--device", "cpu")
    assert out.strip()
