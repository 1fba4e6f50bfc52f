"""`loraforge info` tells the truth about .gguf files, quantized folders, broken files and checkpoints."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from conftest import randomize_adapter
from test_cli import cli

from loraforge.cli.info import describe
from loraforge.errors import LoraForgeError
from loraforge.lora import LoraConfig, add_lora, save_adapter


def test_gguf_is_described_as_the_file_not_its_conversion(smol_folder):
    from loraforge.model.embedded import embedded_gguf

    gguf = embedded_gguf()
    info = json.loads(cli("info", str(gguf), "--json").stdout)
    assert info["path"] == str(gguf) and info["size_on_disk_bytes"] == gguf.stat().st_size
    assert info["quantization"] == gguf.stem.rsplit(".", 1)[-1]  # the file is named for its type: ...Q4_1.gguf
    assert info["quantization"] in info["tensor_types"]
    assert info["bits_per_parameter"] < 8  # not the fp32 size of the converted folder
    converted = json.loads(cli("info", str(smol_folder), "--json").stdout)
    assert info["parameters"] == converted["parameters"] and info["layers"] == converted["layers"]
    assert info["converted_folder"] == str(smol_folder)


@pytest.mark.parametrize("quant, bits", [("nf4", 4), ("int8", 8)])
def test_quantized_folder_names_its_quantization(tiny_folder, tmp_path, quant, bits):
    from loraforge.quant.checkpoint import QuantSpec
    from loraforge.quant.export import write_quantized_model

    out = write_quantized_model(str(tiny_folder), tmp_path / quant, QuantSpec(quant), device="cpu")
    info, plain = describe(str(out)), describe(str(tiny_folder))
    assert info["quantization"] == f"{quant} with double quantization"
    assert info["quantized_linears"] == 14 and info["parameters"] == plain["parameters"]
    assert plain["bits_per_parameter"] == pytest.approx(32, abs=0.1) and "quantization" not in plain
    # the embeddings and output head (most of this tiny model) stay fp32: below fp32, above the linears' bits
    assert bits < info["bits_per_parameter"] < 32


@pytest.fixture()
def adapter(tiny, tmp_path):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize_adapter(model, "a", std=0.05)
    return save_adapter(model, "a", tmp_path / "adapter")


def _header(path):
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _write(path, header, body, n=None):
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if n is None else n) + text + body)


def _shift_offsets(path):
    header, body = _header(path)
    key = next(k for k in header if k != "__metadata__")
    b, e = header[key]["data_offsets"]
    header[key]["data_offsets"] = [b + len(body), e + len(body)]
    _write(path, header, body)


def _grow_shape(path):
    header, body = _header(path)
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s * 2 for s in header[key]["shape"]]
    _write(path, header, body)


BREAKS = {
    "truncated": (lambda f: f.write_bytes(f.read_bytes()[:-100]), "truncated safetensors file"),
    "header longer than the file": (lambda f: _write(f, *_header(f), n=10**7), "the header claims 10000000 bytes"),
    "offsets past the end": (_shift_offsets, "truncated safetensors file .* ends at byte"),
    "shape that lies about the bytes": (_grow_shape, "needs .* bytes, the header gives it"),
    "header not JSON": (lambda f: f.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 64), "not valid JSON"),
    "eight bytes short": (lambda f: f.write_bytes(b"\x01\x02"), "no header"),
}


@pytest.mark.parametrize("kind", BREAKS)
def test_broken_adapter_is_reported_not_described(adapter, kind):
    brk, match = BREAKS[kind]
    brk(adapter / "adapter_model.safetensors")
    with pytest.raises(LoraForgeError, match=match) as e:
        describe(str(adapter))
    assert "adapter_model.safetensors" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["truncated", "header longer than the file", "offsets past the end", "header not JSON"])
def test_broken_model_weights_are_one_line(tiny_folder, tmp_path, kind):
    folder = shutil.copytree(tiny_folder, tmp_path / "m")
    brk, match = BREAKS[kind]
    brk(folder / "model.safetensors")
    r = cli("info", str(folder), check=False)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "model.safetensors" in r.stderr.strip().splitlines()[-1]


def test_adapter_info_counts_its_tensors(adapter):
    info = json.loads(cli("info", str(adapter), "--json").stdout)
    assert info["method"] == "LORA" and info["tensors"] == 8  # q_proj, down_proj x 2 layers x A, B
    assert info["parameters"] == 2 * (4 * 32 + 32 * 4) + 2 * (4 * 64 + 32 * 4)


def test_non_finite_adapter_is_reported(adapter):
    from safetensors.torch import load_file, save_file

    f = adapter / "adapter_model.safetensors"
    tensors = load_file(str(f))
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(f))
    with pytest.raises(LoraForgeError, match="NaN or infinite"):
        describe(str(adapter))


def test_training_checkpoint_is_described_as_one(tmp_path):
    from loraforge.train.checkpoint import save_checkpoint

    run = tmp_path / "runs" / "x"
    params = {"model.layers.0.self_attn.q_proj.lora_A": torch.nn.Parameter(torch.zeros(4, 32)),
              "model.layers.0.self_attn.q_proj.lora_B": torch.nn.Parameter(torch.zeros(32, 4))}
    opt = torch.optim.AdamW(params.values())
    ckpt = save_checkpoint(run, 7, params, opt, {"config": {"method": "lora", "rank": 4, "alpha": 8},
                                                 "best_val_loss": 1.5}, keep=2)
    info = json.loads(cli("info", str(ckpt), "--json").stdout)
    assert info["kind"].startswith("training checkpoint") and info["step"] == 7 and info["run"] == str(run)
    assert info["method"] == "lora" and info["rank"] == 4
    assert info["trainable_tensors"] == 2 and info["trainable_parameters"] == 2 * 4 * 32
