"""quantize / dequantize contracts: error bounds, chunking, input untouched, bad layouts, sizes."""

import pytest
import torch
from torch import nn

from loraforge.errors import LoraForgeError
from loraforge.quant import (
    QuantLinear,
    bits_per_parameter,
    dequantize,
    functional,
    quantize,
    quantized_nbytes,
    state_from_tensors,
    state_to_tensors,
)
from loraforge.quant.codebooks import code_4bit, dynamic_code

QUANT_TYPES = ["nf4", "fp4", "int8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def per_value_absmax(weight: torch.Tensor, blocksize: int) -> torch.Tensor:
    """absmax of each value's block, [n], computed independently of the library."""
    flat = weight.reshape(-1).float()
    blocks = [
        flat[i : i + blocksize].abs().max().expand(min(blocksize, flat.numel() - i))
        for i in range(0, flat.numel(), blocksize)
    ]
    return torch.cat(blocks)


# -- error bounds -------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 30), (64, 64), (3, 1000)])
def test_int8_error_is_at_most_half_a_step(shape):
    weight = torch.randn(shape, generator=gen(0)) * torch.rand(shape[0], 1, generator=gen(1))
    weight[0, :5] = 0.0
    state = quantize(weight, "int8", 64, double_quant=False)
    assert state.data.dtype == torch.int8 and state.data.shape == weight.shape
    error = (dequantize(state) - weight).abs().reshape(-1)
    step = per_value_absmax(weight, 64) / 127  # the value of one int8 code in each block
    assert (error <= step / 2 * (1 + 1e-5) + 1e-12).all()
    assert state.data.abs().max() == 127  # the block maximum maps to the end of the range


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_error_is_at_most_half_the_widest_gap(quant_type):
    weight = torch.randn(33, 70, generator=gen(2))
    levels = torch.sort(code_4bit(quant_type)).values
    half_gap = (levels[1:] - levels[:-1]).max() / 2
    error = (dequantize(quantize(weight, quant_type, 64, False)) - weight).abs().reshape(-1)
    assert (error <= per_value_absmax(weight, 64) * half_gap * (1 + 1e-6)).all()


def test_double_quant_absmax_error_is_bounded_by_the_dynamic_map():
    weight = torch.randn(300, 129, generator=gen(3)) * torch.rand(300, 1, generator=gen(4))
    plain, nested = quantize(weight, "nf4", 64, False), quantize(weight, "nf4", 64, True)
    assert nested.absmax.dtype == torch.uint8 and nested.nested_absmax.numel() == -(
        -plain.absmax.numel() // 256
    )
    code = dynamic_code()
    # half the widest gap of the map, plus one grid step of the 65536-point lookup, per nested block
    bound = ((code[1:] - code[:-1]).max() / 2 + 2 / 65535) * nested.nested_absmax.repeat_interleave(256)
    error = (functional.dequantize_absmax(nested) - plain.absmax).abs()
    assert (error <= bound[: error.numel()] * (1 + 1e-5)).all()


@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_chunking_does_not_change_results(quant_type, monkeypatch):
    weight = torch.randn(37, 129, generator=gen(5))  # odd count, short last block
    whole = quantize(weight, quant_type, 64, True)
    monkeypatch.setattr(functional, "_CHUNK", 256)  # 19 chunks instead of 1
    chunked = quantize(weight, quant_type, 64, True)
    for a, b in zip(whole.tensors(), chunked.tensors(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(dequantize(chunked), dequantize(whole))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk", [128, 1 << 17])
def test_dequantize_4bit_equals_its_reference_bit_for_bit(quant_type, dtype, chunk, monkeypatch):
    """The chunked, table-driven dequantize writes every dtype exactly as the plain definition does
    (float32 product, one rounding); odd count, short last block, one step or many."""
    from loraforge import ops

    monkeypatch.setattr(functional, "_DEQUANT_CHUNK", chunk)
    for shape, blocksize in (((37, 129), 64), ((16, 96), 32), ((3, 5), 256)):
        weight = torch.randn(shape, generator=gen(8)) * 0.02
        for double_quant in (False, True):
            state = quantize(weight, quant_type, blocksize, double_quant)
            absmax = functional.dequantize_absmax(state)
            args = (state.data, absmax, state.quant_map, blocksize, state.shape, dtype)
            want = functional.dequantize_4bit_ref(*args)
            got = functional.dequantize_4bit(*args)
            assert got.dtype == dtype and got.shape == shape
            assert torch.equal(got.view(torch.int8), want.view(torch.int8)), (shape, double_quant)
            with ops.use_reference():  # the switch runs the definition itself
                assert torch.equal(dequantize(state, dtype), want)


def test_quantize_does_not_modify_its_input():
    weight = torch.randn(8, 64, generator=gen(6))
    before = weight.clone()
    for quant_type in QUANT_TYPES:
        quantize(weight, quant_type)
    assert torch.equal(weight, before)


# -- bad layouts and configurations -----------------------------------------------------------


def corrupt(tensors: dict, name: str, how: str) -> dict:
    tensors = dict(tensors)
    state_key = next(k for k in tensors if ".quant_state." in k)
    if how == "missing absmax":
        del tensors[f"{name}.absmax"]
    elif how == "missing codes":
        del tensors[name]
    elif how == "absmax shape":
        tensors[f"{name}.absmax"] = tensors[f"{name}.absmax"][:-1]
    elif how == "codes shape":
        tensors[name] = tensors[name][:-1]
    elif how == "quant_map shape":
        tensors[f"{name}.quant_map"] = torch.zeros(15)
    elif how == "unknown type":
        tensors[state_key.replace("nf4", "nf3")] = tensors.pop(state_key)
    elif how == "no quant_state":
        del tensors[state_key]
    elif how == "bad json":
        tensors[state_key] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    elif how == "json without shape":
        tensors[state_key] = torch.tensor(
            list(b'{"quant_type": "nf4", "blocksize": 64, "dtype": "float32"}'), dtype=torch.uint8
        )
    elif how == "bad blocksize":
        text = bytes(tensors[state_key].tolist()).replace(b'"blocksize": 64', b'"blocksize": 48')
        tensors[state_key] = torch.tensor(list(text), dtype=torch.uint8)
    elif how == "nested without offset":
        text = bytes(tensors[state_key].tolist()).split(b', "nested_blocksize"')[0] + b"}"
        tensors[state_key] = torch.tensor(list(text), dtype=torch.uint8)
    return tensors


@pytest.mark.parametrize(
    "how",
    [
        "missing absmax",
        "missing codes",
        "absmax shape",
        "codes shape",
        "quant_map shape",
        "unknown type",
        "no quant_state",
        "bad json",
        "json without shape",
        "bad blocksize",
        "nested without offset",
    ],
)
def test_bad_state_names_the_weight(how):
    name = "model.layers.1.self_attn.o_proj.weight"
    tensors = state_to_tensors(quantize(torch.randn(30, 20, generator=gen(17))), name)
    state_from_tensors(tensors, name)  # the intact state reads fine
    with pytest.raises(LoraForgeError, match=r"o_proj\.weight"):
        state_from_tensors(corrupt(tensors, name, how), name)


@pytest.mark.parametrize(
    ("args", "match"),
    [(("nf3", 64), "quant_type"), (("nf4", 48), "blocksize")],
)
def test_bad_config_is_a_user_error(args, match):
    with pytest.raises(LoraForgeError, match=match):
        quantize(torch.randn(4, 64), *args)
    with pytest.raises(LoraForgeError, match=match):
        QuantLinear(64, 4, quant_type=args[0], blocksize=args[1])
    with pytest.raises(LoraForgeError, match="dtype"):
        quantize(torch.ones(4, 64, dtype=torch.int32))


# -- sizes --------------------------------------------------------------------------------------


def test_bits_per_parameter_nf4_double_quant():
    weight = torch.randn(1024, 1024, generator=gen(18))
    nested, plain = quantize(weight, "nf4", 64, True), quantize(weight, "nf4", 64, False)
    # counted from the tensors actually stored: every serialized tensor except the JSON metadata,
    # plus the float32 offset, which the layout keeps inside that JSON
    stored = state_to_tensors(nested, "w")
    assert quantized_nbytes(nested) == 4 + sum(
        t.numel() * t.element_size() for k, t in stored.items() if "quant_state" not in k
    )
    assert 4.1 < bits_per_parameter(nested) < 4.2  # 4 + 8/64 + 32/(64*256) + the tables
    assert 4.5 < bits_per_parameter(plain) < 4.52  # 4 + 32/64 + the table
    assert bits_per_parameter(QuantLinear.from_linear(nn.Linear(1024, 1024))) == bits_per_parameter(nested)
