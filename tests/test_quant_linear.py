"""QuantLinear: forward and input gradient against a float64 reference, frozen-weight contracts,
state-dict round trips, and quantize_linears on a tiny model."""

import gc
import weakref

import pytest
import torch
from torch import nn

from loraforge.errors import LoraForgeError
from loraforge.quant import QuantLinear, dequantize, quantize, quantize_linears, state_names

QUANT_TYPES = ["nf4", "fp4", "int8"]


pytestmark = pytest.mark.usefixtures("one_thread")


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- QuantLinear --------------------------------------------------------------------------------


def make_layer(
    quant_type: str, double_quant: bool = True, bias: bool = True, seed: int = 7, shape=(40, 96)
) -> QuantLinear:
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(shape, generator=gen(seed)) * 0.2)
        if bias:
            linear.bias.copy_(torch.randn(shape[0], generator=gen(seed + 1)))
    return QuantLinear.from_linear(linear, quant_type, 64, double_quant)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_forward_and_input_grad_match_float64_reference(quant_type, double_quant):
    layer = make_layer(quant_type, double_quant)
    w64 = layer.dequantize(torch.float64)  # [out, in]
    x = torch.randn(2, 5, 96, generator=gen(8), requires_grad=True)
    grad_out = torch.randn(2, 5, 40, generator=gen(9))

    y = layer(x)
    y.backward(grad_out)

    expected = x.detach().double() @ w64.T + layer.bias.double()
    torch.testing.assert_close(y, expected.float())
    torch.testing.assert_close(x.grad, (grad_out.double() @ w64).float())
    assert y.dtype == x.dtype
    for name, buffer in layer.named_buffers():
        assert not buffer.requires_grad and buffer.grad is None, name
    assert not layer.bias.requires_grad and layer.bias.grad is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_dtype_is_input_dtype(dtype):
    layer = make_layer("nf4")
    x = torch.randn(4, 96, generator=gen(10))
    y = layer(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), layer(x), atol=0.1, rtol=0.05)  # low-precision matmul
    layer.compute_dtype = torch.float32  # compute in float32, still return the input dtype
    y32 = layer(x.to(dtype))
    assert y32.dtype == dtype
    torch.testing.assert_close(
        y32, (x.to(dtype).double() @ layer.dequantize(torch.float64).T + layer.bias.double()).to(dtype)
    )


def test_adapter_ids_are_ignored_by_the_base_layer():
    layer = make_layer("nf4")
    x = torch.randn(3, 96, generator=gen(11))
    assert torch.equal(layer(x, torch.tensor([0, 1, 0])), layer(x))


def test_backward_does_not_keep_a_dequantized_weight():
    layer = make_layer("nf4", bias=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(3, 96, generator=gen(12), requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert not [t for t in saved if t.shape == (40, 96)]
    y.sum().backward()  # and backward still works
    assert x.grad is not None


def test_frozen_weight_unchanged_after_optimizer_step():
    torch.manual_seed(13)
    base = make_layer("nf4")
    head = nn.Linear(40, 3)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    trainable = [p for p in (*base.parameters(), *head.parameters()) if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in head.parameters()]  # none from the quantized layer
    optimizer = torch.optim.AdamW(trainable, lr=0.1)
    head_before = head.weight.detach().clone()

    loss = head(base(torch.randn(6, 96, generator=gen(14)))).square().mean()
    loss.backward()
    optimizer.step()

    assert not torch.equal(head.weight, head_before)  # the step did happen
    after = base.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_to_dtype_moves_bias_but_keeps_quantized_state_exact():
    layer = make_layer("fp4")
    before = {name: b.clone() for name, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    for name, buffer in layer.named_buffers():
        assert buffer.dtype == before[name].dtype and torch.equal(buffer, before[name]), name
    layer.to("meta")
    assert all(b.is_meta for b in layer.buffers()) and layer.bias.is_meta


# -- layout and state dicts ---------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_state_tensors_round_trip(quant_type, double_quant, tmp_path):
    from safetensors.torch import load_file, save_file

    layer = make_layer(quant_type, double_quant)
    tensors = layer.to_state_tensors("model.layers.3.mlp.down_proj")
    suffix = "loraforge__int8" if quant_type == "int8" else f"bitsandbytes__{quant_type}"
    assert f"model.layers.3.mlp.down_proj.weight.quant_state.{suffix}" in tensors
    assert state_names(tensors) == ["model.layers.3.mlp.down_proj.weight"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "q.safetensors")
    loaded = QuantLinear.from_state_tensors(
        load_file(tmp_path / "q.safetensors"), "model.layers.3.mlp.down_proj"
    )

    assert (loaded.quant_type, loaded.blocksize, loaded.double_quant) == (quant_type, 64, double_quant)
    for (name, a), (_, b) in zip(layer.named_buffers(), loaded.named_buffers(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), name
    x = torch.randn(2, 96, generator=gen(15))
    assert torch.equal(loaded(x), layer(x))


def test_state_dict_round_trip_through_meta_model():
    source = nn.Sequential(
        make_layer("nf4"),
        nn.ReLU(),
        make_layer("int8", double_quant=False, bias=False, seed=3, shape=(40, 40)),
    )
    sd = source.state_dict()
    assert "0.weight.quant_state.bitsandbytes__nf4" in sd and "2.weight.quant_state.loraforge__int8" in sd
    with torch.device("meta"):
        target = nn.Sequential(QuantLinear(96, 40), nn.ReLU(), QuantLinear(40, 40, bias=False))
    target.load_state_dict(sd, assign=True)  # strict: every key used, none missing
    assert target[2].quant_type == "int8" and not target[2].double_quant  # taken from the checkpoint
    x = torch.randn(2, 96, generator=gen(16))
    assert torch.equal(target(x), source(x))

    with pytest.raises(RuntimeError, match="checkpoint shape"):
        QuantLinear(40, 96).load_state_dict(make_layer("nf4").state_dict())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        QuantLinear(96, 40).load_state_dict(make_layer("nf4").state_dict() | {"extra": torch.zeros(1)})


# -- quantize_linears ---------------------------------------------------------------------------


class AdapterLinear(nn.Linear):
    """Like our model's base linear: an nn.Linear subclass called as proj(x, adapter_ids)."""

    def forward(self, x, adapter_ids=None):
        return super().forward(x)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj, self.o_proj = AdapterLinear(16, 16), AdapterLinear(16, 16, bias=False)
        self.gate = nn.Linear(16, 4)

    def forward(self, x, adapter_ids=None):
        return self.o_proj(torch.relu(self.q_proj(x, adapter_ids)), adapter_ids)


class TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.lm_head = nn.Linear(16, 10, bias=False)

    def forward(self, x, adapter_ids=None):
        for layer in self.layers:
            x = layer(x, adapter_ids)
        return self.lm_head(x)


def test_quantize_linears_replaces_in_place_and_frees_originals():
    torch.manual_seed(19)
    model = TinyModel()
    originals = [weakref.ref(model.layers[i].q_proj.weight) for i in range(2)]
    replaced = quantize_linears(model, "nf4", skip=["gate"])
    assert replaced == 4
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.layers[0].gate, nn.Linear)
    assert all(isinstance(model.layers[i].q_proj, QuantLinear) for i in range(2))
    gc.collect()
    assert all(ref() is None for ref in originals)  # no full-precision copy kept

    # the model now computes with the dequantized weights
    x = torch.randn(3, 16, generator=gen(20))
    h = x
    for block in model.layers:
        h = torch.relu(h @ block.q_proj.dequantize().T + block.q_proj.bias) @ block.o_proj.dequantize().T
    torch.testing.assert_close(model(x, torch.tensor([0, 1, 1])), model.lm_head(h))

    assert quantize_linears(TinyModel(), "int8", skip=lambda name: name.startswith("layers.1")) == 3
    assert quantize_linears(model, "nf4") == 2  # only the gates were left


def test_quantize_linears_refuses_meta_weights():
    with torch.device("meta"):
        model = TinyModel()
    with pytest.raises(LoraForgeError, match="layers.0.q_proj"):
        quantize_linears(model, "nf4")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
def test_cuda_matches_cpu(quant_type):
    weight = torch.randn(130, 257, generator=gen(21)).bfloat16()
    cpu, cuda = quantize(weight, quant_type), quantize(weight.cuda(), quant_type)
    for a, b in zip(cpu.tensors(), cuda.tensors(), strict=True):
        assert torch.equal(a, b.cpu())
    assert torch.equal(dequantize(cuda).cpu(), dequantize(cpu))
    layer = make_layer(quant_type).cuda()
    x = torch.randn(4, 96, generator=gen(22))
    torch.testing.assert_close(layer(x.cuda()).cpu(), make_layer(quant_type)(x))


def test_dense_cache_serves_the_same_outputs_without_dequantizing(tiny_folder, monkeypatch):
    """`serve` caches each NF4 weight dequantized: decoding then gives the same logits and never
    dequantizes; training (grad on) still goes through the codes."""
    import loraforge.quant.linear as ql
    from loraforge.model import load_model
    from loraforge.quant import cache_dense_weights

    model, _ = load_model(str(tiny_folder), device="cpu", dtype="bfloat16", quantize="nf4")
    ids = torch.randint(0, 200, (3, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids)
    n = cache_dense_weights(model, torch.bfloat16)
    layers = [m for m in model.modules() if isinstance(m, ql.QuantLinear)]
    assert n == sum(m.in_features * m.out_features * 2 for m in layers) > 0
    calls = []
    real = ql.dequantize
    monkeypatch.setattr(ql, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        got = model(ids)
    assert calls == [] and torch.equal(got, want)
    model.to("cpu")  # a move drops the copies rather than leaving them behind on the old device
    assert all(m.dense is None for m in layers)
