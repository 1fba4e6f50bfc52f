"""QLoRA: LoRA on a quantized base (training, adapter files, mixed batches) and merging onto it."""

from __future__ import annotations

import contextlib
import json
import logging

import pytest
import torch
from conftest import randomize_adapter
from safetensors.torch import load_file

from loraforge.cli import build_parser
from loraforge.errors import LoraForgeError
from loraforge.lora import (
    LoraConfig,
    adapter_ids_for,
    add_lora,
    load_adapter,
    merge_adapter,
    save_adapter,
    save_merged,
    set_adapter,
    set_trainable_params,
)
from loraforge.model import load_model
from loraforge.quant import QuantLinear

IDS = torch.randint(0, 49152, (3, 10), generator=torch.Generator().manual_seed(0))
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture()
def qtiny(tiny_folder):
    return load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")


randomize = randomize_adapter


def packed_buffers(model) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers() if n != "inv_freq"}


@contextlib.contextmanager
def loraforge_log():
    # our own handler: the CLI's logging setup may have stopped "loraforge" propagating to pytest's
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("loraforge")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def test_lora_wraps_the_4bit_layer_like_a_float_one(qtiny, tiny_folder):
    """Quantized base + LoRA == a float model whose weights are the dequantized ones + the same LoRA."""
    model, _ = qtiny
    ref, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, QuantLinear):
                ref.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
    paths = add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=ALL))
    assert len(paths) == 14
    add_lora(ref, "a", LoraConfig(r=4, alpha=8, targets=ALL))
    randomize(model, "a")
    randomize(ref, "a")
    lora = model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(lora.base, QuantLinear)
    assert lora.lora_A["a"].dtype == torch.float32  # the compute dtype, not the packed uint8
    with torch.no_grad():
        torch.testing.assert_close(model(IDS), ref(IDS))


def test_qlora_training_lowers_the_loss_and_leaves_packed_weights_alone(qtiny):
    model, _ = qtiny
    add_lora(model, "a", LoraConfig(r=8, alpha=16, targets=ALL))
    params = set_trainable_params(model, "a")
    before = packed_buffers(model)
    embed = model.model.embed_tokens.weight.clone()
    opt = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss = model(IDS, labels=IDS)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1.0, losses
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    after = packed_buffers(model)
    assert before.keys() == after.keys() and any(".weight.absmax" not in n for n in before)
    for name, b in before.items():  # packed codes, scales, tables: the same bytes
        assert b.dtype == after[name].dtype and torch.equal(b, after[name]), name
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert model.get_submodule("model.layers.1.self_attn.v_proj").lora_B["a"].abs().sum() > 0


def test_adapter_round_trip_and_mixed_batch_on_a_quantized_base(qtiny, tiny_folder, tmp_path):
    model, _ = qtiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    add_lora(model, "b", LoraConfig(r=2, alpha=4, targets=["v_proj", "up_proj"]))
    randomize(model, "a", seed=1)
    randomize(model, "b", seed=2)
    save_adapter(model, "a", tmp_path / "a")

    fresh, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")
    load_adapter(fresh, tmp_path / "a", "a")
    with torch.no_grad():
        set_adapter(model, "a")
        want_a = model(IDS)
        torch.testing.assert_close(fresh(IDS), want_a, rtol=0, atol=0)
        set_adapter(model, "b")
        want_b = model(IDS)
        set_adapter(model, None)
        want_base = model(IDS)
        mixed = model(IDS, adapter_ids=adapter_ids_for(model, ["b", None, "a"]))
    torch.testing.assert_close(mixed[0], want_b[0])
    torch.testing.assert_close(mixed[1], want_base[1])
    torch.testing.assert_close(mixed[2], want_a[2])
    assert not torch.allclose(want_a, want_base)


def test_merge_onto_a_quantized_base_is_dequantized_w_plus_sba(qtiny, tmp_path):
    model, tok = qtiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize(model, "a")
    with pytest.raises(LoraForgeError, match="cannot merge into a quantized base in place; use `loraforge merge`"):
        merge_adapter(model, "a")
    with loraforge_log() as records:
        out = save_merged(model, tok, tmp_path / "merged", "a")
    assert any("full precision" in r.getMessage() and "not re-quantized" in r.getMessage() for r in records)

    tensors = load_file(str(out / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in tensors.values())  # no packed codes, no quant_state
    assert not any(".absmax" in k or ".quant_state." in k for k in tensors)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    for name, layer in model.named_modules():
        if isinstance(layer, QuantLinear):
            path = name.removesuffix(".base")
            w = layer.dequantize(torch.float64)  # the reference, in float64
            lora = model.get_submodule(path)
            if path != name:  # an adapted layer: + s * B @ A
                w = w + lora.scaling["a"] * (lora.lora_B["a"].double() @ lora.lora_A["a"].double())
            torch.testing.assert_close(tensors[f"{path}.weight"].double(), w, rtol=1e-6, atol=1e-7)
    merged, _ = load_model(str(out), device="cpu", dtype="float32")
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS), model(IDS), rtol=1e-4, atol=1e-4)


def test_merge_command_on_a_prequantized_base(qtiny, tiny_folder, tmp_path):
    model, _ = qtiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["o_proj", "gate_proj"]))
    randomize(model, "a", seed=3)
    save_adapter(model, "a", tmp_path / "a")
    parser = build_parser()
    commands = [
        ["quantize", "--model", str(tiny_folder), "--out", str(tmp_path / "nf4")],
        ["merge", "--model", str(tmp_path / "nf4"), "--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m1")],
        ["merge", "--model", str(tiny_folder), "--quantize", "nf4", "--adapter", str(tmp_path / "a"),
         "--out", str(tmp_path / "m2")],
    ]
    for argv in commands:
        args = parser.parse_args(argv)
        assert args._run(args) == 0
    # the same codes merged the same way, whether quantized on load or beforehand
    a, b = load_file(str(tmp_path / "m1" / "model.safetensors")), load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "m1"))[0](IDS), model(IDS), rtol=1e-4, atol=1e-4)


def test_generate_with_quantize_flag(tiny_folder, capsys):
    args = build_parser().parse_args(["generate", "--model", str(tiny_folder), "--quantize", "nf4", "--raw",
                                      "--prompt", "Once upon a time", "--max-new-tokens", "4"])
    assert args._run(args) == 0
    assert capsys.readouterr().out.strip()
