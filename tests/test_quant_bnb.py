"""Parity with bitsandbytes on CPU: codes byte for byte, nested statistics, dequantized values, layout."""

import bitsandbytes.functional as bnb_functional  # a declared test dependency: missing means failing
import pytest
import torch

from loraforge.quant import QuantLinear, dequantize, quantize, state_from_tensors, state_to_tensors
from loraforge.quant.codebooks import code_4bit, dynamic_code, rounding_table_4bit

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# numel 70, 990, 77100 (1205 blocks: 5 nested blocks, the last one short), 3: none a multiple of 64
SHAPES = [(5, 14), (33, 30), (300, 257), (1, 3)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _eager_bnb():
    # bitsandbytes wraps its pure-torch fallbacks (odd last dimension) in torch.compile, which costs
    # seconds per shape on CPU; eager mode computes the same values.
    with torch._dynamo.config.patch(disable=True):
        yield


def bnb_quantize(weight, quant_type, double_quant, blocksize=64):
    return bnb_functional.quantize_4bit(
        weight, blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
    )


def assert_same_as_bnb(weight, quant_type, double_quant, blocksize=64):
    packed, qs = bnb_quantize(weight, quant_type, double_quant, blocksize)
    ours = quantize(weight, quant_type, blocksize, double_quant)
    assert ours.data.dtype == packed.dtype == torch.uint8
    assert torch.equal(ours.data, packed)  # same bytes, same [ceil(n/2), 1] shape
    assert torch.equal(ours.absmax, qs.absmax)
    assert torch.equal(ours.quant_map, qs.code)
    if double_quant:
        assert torch.equal(ours.offset, qs.offset)
        assert torch.equal(ours.nested_absmax, qs.state2.absmax)
        assert torch.equal(ours.nested_quant_map, qs.state2.code)
        assert ours.nested_blocksize == qs.state2.blocksize
    else:
        assert not ours.double_quant and not qs.nested
    # bitsandbytes rounds code * absmax (float32) once to the weight dtype; so do we, so equal.
    expected = bnb_functional.dequantize_4bit(packed, qs)
    got = dequantize(ours)
    assert got.dtype == expected.dtype == weight.dtype
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_codebooks_are_bnb_tables():
    for quant_type in ("nf4", "fp4"):
        assert torch.equal(code_4bit(quant_type), bnb_functional.get_4bit_type(quant_type, device="cpu"))
    assert torch.equal(dynamic_code(), bnb_functional.create_dynamic_map())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bnb(quant_type, double_quant, dtype, shape):
    gen = torch.Generator().manual_seed(hash((quant_type, double_quant, shape)) % 2**31)
    # rows with different scales so that the nested (double-quant) statistics are not trivial
    weight = torch.randn(shape, generator=gen) * torch.rand(shape[0], 1, generator=gen) * 3
    assert_same_as_bnb(weight.to(dtype), quant_type, double_quant)


@pytest.mark.parametrize("blocksize", [32, 128, 256, 512, 1024, 2048, 4096])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bnb_all_blocksizes(quant_type, blocksize):
    weight = torch.randn(37, 130, generator=torch.Generator().manual_seed(blocksize))
    assert_same_as_bnb(weight, quant_type, True, blocksize)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_matches_bnb_on_ties_zeros_and_tails(quant_type):
    midpoints, _ = rounding_table_4bit(quant_type)
    up, down = torch.tensor(2.0), torch.tensor(-2.0)
    # Full blocks with absmax 1 (so scaling is exact): values exactly on a rounding midpoint and one
    # float32 step either side, signed zeros and tiny values (FP4 has +0 and -0 codes).
    special = torch.cat([midpoints, -midpoints, midpoints.nextafter(up), midpoints.nextafter(down)])
    special = torch.cat([special, torch.tensor([0.0, -0.0, 1e-30, -1e-30])])  # [64]
    rows = torch.cat([special, torch.zeros(126 - special.numel())]).view(2, 63)
    blocks = torch.cat([torch.ones(2, 1), rows], dim=1)  # [2, 64]
    # A short last block with absmax 0.3, holding values whose quotient by 0.3 is a midpoint: the last
    # block divides by absmax where full blocks multiply by its reciprocal, and the two can round to
    # different sides of the midpoint.
    absmax = torch.tensor(0.3)
    near = torch.stack(
        [midpoints * absmax, (midpoints * absmax).nextafter(up), (midpoints * absmax).nextafter(down)]
    )
    near = near.flatten()  # [45]
    sides_differ = (near / absmax > midpoints.repeat(3)) != (near * (1.0 / absmax) > midpoints.repeat(3))
    assert sides_differ.any()  # the case this block is here for does occur
    tail = torch.cat([absmax.view(1), near])  # [46]
    weight = torch.cat([blocks.flatten(), torch.zeros(64), tail])  # [238]: an all-zero block in the middle
    for double_quant in (False, True):
        assert_same_as_bnb(weight.view(2, -1), quant_type, double_quant)
    assert_same_as_bnb(torch.zeros(3, 10), quant_type, True)  # one short all-zero block: absmax 1e-38
    assert_same_as_bnb(torch.full((7, 100), 0.5), quant_type, True)  # every absmax equals the mean


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_reads_our_layout(quant_type, double_quant):
    weight = torch.randn(48, 40, generator=torch.Generator().manual_seed(1))
    name = "model.layers.0.mlp.up_proj.weight"
    ours = state_to_tensors(quantize(weight, quant_type, 64, double_quant), name)

    # Byte-for-byte the tensors bitsandbytes writes for the same weight, JSON included.
    packed, qs = bnb_quantize(weight, quant_type, double_quant)
    theirs = {f"{name}.{key}": t for key, t in qs.as_dict(packed=True).items()} | {name: packed}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        assert torch.equal(ours[key], theirs[key]), key

    # And bitsandbytes' own reader accepts ours and dequantizes it to the same weight.
    stats = {key[len(name) + 1 :]: t for key, t in ours.items() if key != name}
    read = bnb_functional.QuantState.from_dict(stats, device=torch.device("cpu"))
    expected = bnb_functional.dequantize_4bit(ours[name], read)
    torch.testing.assert_close(dequantize(state_from_tensors(ours, name)), expected, rtol=0, atol=0)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_we_read_bnb_layout(quant_type, double_quant):
    gen = torch.Generator().manual_seed(2)
    weight, bias = torch.randn(24, 50, generator=gen).bfloat16(), torch.randn(24, generator=gen)
    packed, qs = bnb_quantize(weight, quant_type, double_quant)
    tensors = {f"proj.weight.{key}": t for key, t in qs.as_dict(packed=True).items()}
    tensors |= {"proj.weight": packed, "proj.bias": bias}

    state = state_from_tensors(tensors, "proj.weight")
    expected = bnb_functional.dequantize_4bit(packed, qs)
    torch.testing.assert_close(dequantize(state), expected, rtol=0, atol=0)

    # The layer computes in x's dtype (float32 here), so the reference is bnb's float32 dequantization.
    qs.dtype = torch.float32
    weight32 = bnb_functional.dequantize_4bit(packed, qs)
    layer = QuantLinear.from_state_tensors(tensors, "proj")
    x = torch.randn(3, 50, generator=gen)
    torch.testing.assert_close(layer(x), x @ weight32.T + bias)


def test_we_read_bnb_wide_quant_storage():
    # FSDP-QLoRA checkpoints keep the packed bytes in a wider dtype; the bytes are what matter.
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    packed, qs = bnb_functional.quantize_4bit(weight, quant_type="nf4", quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    tensors = {f"w.{key}": t for key, t in qs.as_dict(packed=True).items()} | {"w": packed}
    expected = bnb_functional.dequantize_4bit(packed, qs)
    torch.testing.assert_close(dequantize(state_from_tensors(tensors, "w")), expected, rtol=0, atol=0)
