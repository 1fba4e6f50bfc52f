"""Quantized loading: quantize-on-load, pre-quantized folders (ours and transformers + bitsandbytes'),
bad quantized files, and bitsandbytes parity on the embedded model's real weights."""

from __future__ import annotations

import json
import shutil
import weakref

import pytest
import torch
from conftest import TOKENIZER_FILES, make_tiny_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import loraforge.quant.checkpoint as checkpoint
from loraforge.cli import build_parser
from loraforge.errors import LoraForgeError
from loraforge.model import count_parameters, load_model
from loraforge.quant import QuantLinear, dequantize, quantize, quantize_linears
from loraforge.quant.checkpoint import QuantSpec
from loraforge.quant.export import write_quantized_model

IDS = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny64_folder(tmp_path_factory, smol_folder):
    # bitsandbytes' CPU kernels need in_features >= its block size (64): the 32-wide tiny model crashes them.
    return make_tiny_folder(tmp_path_factory.mktemp("tiny64") / "tiny64", smol_folder, seed=1, hidden_size=64,
                            intermediate_size=128, head_dim=16)


@pytest.fixture(scope="module")
def nf4_folder(tmp_path_factory, tiny_folder):
    """The tiny model written by `loraforge quantize` (default: nf4)."""
    out = tmp_path_factory.mktemp("q") / "tiny-nf4"
    args = build_parser().parse_args(["quantize", "--model", str(tiny_folder), "--out", str(out)])
    assert args._run(args) == 0
    return out


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def assert_same_quantized(a: nn.Module, b: nn.Module):
    qa, qb = quant_layers(a), quant_layers(b)
    assert qa.keys() == qb.keys() and qa
    for name in qa:
        ba, bb = dict(qa[name].named_buffers()), dict(qb[name].named_buffers())
        assert ba.keys() == bb.keys(), name
        for k in ba:
            assert ba[k].dtype == bb[k].dtype and torch.equal(ba[k], bb[k]), f"{name}.{k}"


# -- quantize on load ---------------------------------------------------------------------------


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int8"])
def test_quantize_on_load_equals_quantizing_the_loaded_model(tiny_folder, quant_type):
    ours, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize=quant_type)
    ref, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    n_float = count_parameters(ref)
    assert quantize_linears(ref, quant_type) == 14  # 2 layers x 7 projections; never lm_head
    assert_same_quantized(ours, ref)
    assert isinstance(ours.lm_head, nn.Linear) and isinstance(ours.model.embed_tokens, nn.Embedding)
    layer = ours.model.layers[0].mlp.up_proj
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == (quant_type, 64, True)  # QLoRA defaults
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref(IDS), rtol=0, atol=0)
    # a quantized weight counts its logical in x out values
    assert count_parameters(ours) == count_parameters(ref) == n_float


def test_quantize_on_load_holds_one_full_precision_weight_at_a_time(tiny_folder, monkeypatch):
    inputs: list[weakref.ref] = []
    real = checkpoint.quantize

    def watching(weight, *args):
        # tensors are freed by reference counting the moment the last reference goes: no gc needed
        alive = [r for r in inputs if r() is not None]
        assert not alive, "an earlier full-precision weight is still referenced"
        inputs.append(weakref.ref(weight))
        return real(weight, *args)

    monkeypatch.setattr(checkpoint, "quantize", watching)
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")
    assert len(inputs) == 14
    assert all(not p.is_meta for p in model.parameters()) and all(not b.is_meta for b in model.buffers())


def test_quantize_flag_is_validated(tiny_folder):
    with pytest.raises(LoraForgeError, match="--quantize 'nf8'"):
        load_model(str(tiny_folder), quantize="nf8")


# -- pre-quantized folders ----------------------------------------------------------------------


def test_quantize_command_writes_the_bitsandbytes_layout(nf4_folder, tiny_folder):
    cfg = json.loads((nf4_folder / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes" and qc["load_in_4bit"] and not qc["load_in_8bit"]
    assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
    assert qc["bnb_4bit_compute_dtype"] == "float32"
    with safe_open(str(nf4_folder / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        name = "model.layers.1.mlp.gate_proj.weight"  # [64, 32]: 2048 values, 32 blocks
        expected = {name: (torch.uint8, [1024, 1]), f"{name}.absmax": (torch.uint8, [32]),
                    f"{name}.quant_map": (torch.float32, [16]), f"{name}.nested_absmax": (torch.float32, [1]),
                    f"{name}.nested_quant_map": (torch.float32, [256])}
        for key, (dtype, shape) in expected.items():
            t = f.get_tensor(key)
            assert (t.dtype, list(t.shape)) == (dtype, shape), key
        meta = json.loads(bytes(f.get_tensor(f"{name}.quant_state.bitsandbytes__nf4").tolist()))
        assert meta["shape"] == [64, 32] and meta["blocksize"] == 64 and meta["dtype"] == "float32"
        # unquantized tensors are written as they are
        with safe_open(str(tiny_folder / "model.safetensors"), "pt") as src:
            for key in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
                assert torch.equal(f.get_tensor(key), src.get_tensor(key))
    assert not any(k.startswith("lm_head.weight.") for k in keys)
    assert (nf4_folder / "tokenizer.json").exists()


def test_prequantized_folder_loads_without_quantizing_and_matches(nf4_folder, tiny_folder, monkeypatch):
    on_load, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")

    def no_quantizing(*args, **kwargs):
        raise AssertionError("quantize() called while loading a pre-quantized folder")

    monkeypatch.setattr(checkpoint, "quantize", no_quantizing)
    with pytest.raises(AssertionError, match="quantize"):  # the patch does catch quantize-on-load
        load_model(str(tiny_folder), quantize="nf4")
    pre, tok = load_model(str(nf4_folder), device="cpu", dtype="float32")
    again, _ = load_model(str(nf4_folder), quantize="nf4")  # asking for what it already is is fine
    assert_same_quantized(pre, on_load)
    assert_same_quantized(again, on_load)
    with torch.no_grad():
        torch.testing.assert_close(pre(IDS), on_load(IDS), rtol=0, atol=0)
    assert tok("hello").input_ids
    with pytest.raises(LoraForgeError, match="already quantized .nf4.*int8"):
        load_model(str(nf4_folder), quantize="int8")


def test_int8_folder_round_trip(tiny_folder, tmp_path):
    out = write_quantized_model(str(tiny_folder), tmp_path / "int8", QuantSpec("int8", 128, False))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "loraforge", "quant_type": "int8", "blocksize": 128, "double_quant": False,
                  "compute_dtype": "float32"}
    pre, _ = load_model(str(out))
    layer = pre.model.layers[0].self_attn.o_proj
    assert (layer.quant_type, layer.blocksize, layer.double_quant) == ("int8", 128, False)
    ref, _ = load_model(str(tiny_folder))
    quantize_linears(ref, "int8", 128, double_quant=False)
    assert_same_quantized(pre, ref)
    with pytest.raises(LoraForgeError, match="already quantized"):
        write_quantized_model(str(out), tmp_path / "twice")


def test_transformers_loads_our_nf4_folder(tiny64_folder, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    out = write_quantized_model(str(tiny64_folder), tmp_path / "nf4")
    ours, _ = load_model(str(out))
    theirs = AutoModelForCausalLM.from_pretrained(str(out), device_map="cpu")
    assert isinstance(theirs.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    exact_bnb_path(theirs)
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS), rtol=1e-4, atol=1e-4)


def exact_bnb_path(model):
    # On CPUs with AVX512-BF16, bitsandbytes' inference path repacks the weight with bf16 block scales
    # and computes in bf16 (logit errors ~2e-2 here); its generic path dequantizes exactly, as we do.
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_reads_what_transformers_and_bitsandbytes_save(tiny64_folder, tmp_path, quant_type):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny64_folder), quantization_config=config, device_map="cpu")
    theirs.save_pretrained(str(tmp_path / "bnb"))
    for f in TOKENIZER_FILES:  # transformers saves the model only
        if (tiny64_folder / f).exists():
            shutil.copy(tiny64_folder / f, tmp_path / "bnb" / f)
    ours, _ = load_model(str(tmp_path / "bnb"), device="cpu", dtype="float32")
    layer = ours.model.layers[1].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.quant_type == quant_type and layer.double_quant
    # same codes as our own quantizer: our quantization is bitsandbytes-exact
    on_load, _ = load_model(str(tiny64_folder), device="cpu", dtype="float32", quantize=quant_type)
    assert_same_quantized(ours, on_load)
    exact_bnb_path(theirs)
    with torch.no_grad():
        # tolerance: float32 rounding of the matmuls, summed in another order
        torch.testing.assert_close(ours(IDS), theirs(IDS).logits, rtol=1e-4, atol=1e-4)


# -- bad quantized files ------------------------------------------------------------------------


def tampered(folder, dest, edit_tensors=None, edit_config=None):
    shutil.copytree(folder, dest)
    if edit_tensors is not None:
        tensors = load_file(str(dest / "model.safetensors"))
        edit_tensors(tensors)
        save_file(tensors, str(dest / "model.safetensors"))
    if edit_config is not None:
        cfg = json.loads((dest / "config.json").read_text())
        edit_config(cfg)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


W = "model.layers.0.mlp.gate_proj.weight"


def _drop_absmax(t):
    del t[f"{W}.absmax"]


def _truncate_codes(t):
    t[W] = t[W][:-8]


def _transpose_shape(t):
    # same number of values, so only the shape check can tell: [64, 32] -> [32, 64]
    key = f"{W}.quant_state.bitsandbytes__nf4"
    meta = json.loads(bytes(t[key].tolist()))
    meta["shape"] = [32, 64]
    t[key] = torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)


def _no_quant_state(t):
    for key in [k for k in t if ".quant_state." in k]:
        del t[key]
    for key in [k for k in t if k.rsplit(".", 1)[-1] in ("absmax", "quant_map", "nested_absmax",
                                                         "nested_quant_map")]:
        del t[key]


@pytest.mark.parametrize(("edit", "match"), [
    (_drop_absmax, rf"model.safetensors: Quantized weight '{W}': missing tensor '{W}.absmax'"),
    (_truncate_codes, rf"model.safetensors: Quantized weight '{W}': '{W}' is uint8 with 1016 values"),
    (_transpose_shape, rf"model.safetensors: quantized weight {W} has shape \(32, 64\), config.json implies "
                       r"\(64, 32\)"),
])
def test_bad_quantized_tensors_name_the_file_and_weight(nf4_folder, tmp_path, edit, match):
    bad = tampered(nf4_folder, tmp_path / "bad", edit_tensors=edit)
    with pytest.raises(LoraForgeError, match=match):
        load_model(str(bad))


def test_bad_quantization_configs(nf4_folder, tmp_path):
    def gptq(c):
        c["quantization_config"] = {"quant_method": "gptq", "bits": 4}

    def llm_int8(c):
        c["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}

    for edit, match in [(gptq, r"config.json: quantization_config.quant_method 'gptq' is not supported"),
                        (llm_int8, r"config.json: a bitsandbytes 8-bit \(LLM.int8\) checkpoint")]:
        with pytest.raises(LoraForgeError, match=match):
            load_model(str(tampered(nf4_folder, tmp_path / edit.__name__, edit_config=edit)))
    # config.json says quantized, the weights are not
    bad = tampered(nf4_folder, tmp_path / "plain", edit_tensors=_no_quant_state)
    with pytest.raises(LoraForgeError, match="quantization_config declares a quantized model, but the weights"):
        load_model(str(bad))


# -- bitsandbytes parity on real weights ----------------------------------------------------------


@pytest.mark.embedded
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bitsandbytes_parity_on_embedded_weights(smol_folder, quant_type):
    import bitsandbytes.functional as F
    names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.14.mlp.down_proj.weight",
             "model.layers.29.self_attn.v_proj.weight"]
    with safe_open(str(smol_folder / "model.safetensors"), "pt") as f:
        weights = {n: f.get_tensor(n) for n in names}
    for name, w in weights.items():
        ours = quantize(w, quant_type, 64, True)
        packed, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type=quant_type)
        assert torch.equal(ours.data, packed), name  # the 4-bit codes, byte for byte
        assert torch.equal(ours.absmax, qs.absmax) and torch.equal(ours.nested_absmax, qs.state2.absmax), name
        assert torch.equal(ours.offset, qs.offset), name
        torch.testing.assert_close(dequantize(ours), F.dequantize_4bit(packed, qs), rtol=0, atol=0)
