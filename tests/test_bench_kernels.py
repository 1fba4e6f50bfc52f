"""The hand-written backward passes behind the CPU speed-ups equal autograd of the plain expressions.

Each fused path (LoRA on a frozen base, the head + cross-entropy, RMSNorm, RoPE, SiLU-gate, rebuilt
saved tensors) is compared with the expression it replaces, on small seeded tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_adapter

from loraforge.lora import LoraConfig, add_lora, set_trainable_params
from loraforge.lora.layer import LoraLinear
from loraforge.lora.registry import AdapterRegistry
from loraforge.model.llama import Linear, _RMSNormFn, _RopeFn, _SiluMulFn, rotate_half
from loraforge.model.loss import chunked_cross_entropy


def _lora(bias: bool, dtype=torch.float64) -> LoraLinear:
    torch.manual_seed(0)
    reg = AdapterRegistry(names=["a"], active="a")
    layer = LoraLinear(Linear(12, 20, bias=bias).to(dtype).requires_grad_(False), reg)
    layer.add("a", 4, 2.5, 0.0)
    with torch.no_grad():
        layer.lora_B["a"].normal_()
    return layer.train()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("x_grad", [False, True])
def test_fused_lora_matches_base_plus_low_rank(bias, x_grad):
    layer = _lora(bias)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=x_grad)
    assert layer._fusable(x, "a")
    y = layer(x)
    g = torch.randn_like(y)
    params = [layer.lora_A["a"], layer.lora_B["a"]] + ([x] if x_grad else [])
    got = torch.autograd.grad(y, params, g)
    ref = layer.base(x) + layer._one(x, "a")
    torch.testing.assert_close(y, ref)
    for a, b in zip(got, torch.autograd.grad(ref, params, g), strict=True):
        torch.testing.assert_close(a, b)


def test_fused_lora_on_quantized_base_matches_unfused(tiny_folder, monkeypatch):
    from loraforge.model import load_model

    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")
    add_lora(model, "a", LoraConfig(r=4, dropout=0.0))
    g = randomize_adapter(model, "a", seed=0)
    params = set_trainable_params(model, "a")
    model.train()
    ids = torch.randint(0, 49152, (2, 10), generator=g)

    def loss_and_grads():
        loss = model(ids, labels=ids)
        return loss.detach(), torch.autograd.grad(loss, params)

    fused = loss_and_grads()
    monkeypatch.setattr(LoraLinear, "_fusable", lambda self, x, name: False)
    plain = loss_and_grads()
    torch.testing.assert_close(fused[0], plain[0])
    for a, b in zip(fused[1], plain[1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [4, 256])
def test_frozen_head_cross_entropy_matches_full_logits(bias, chunk):
    torch.manual_seed(0)
    head = Linear(16, 100, bias=bias).requires_grad_(False)
    hidden = torch.randn(3, 9, 16, requires_grad=True)
    labels = torch.randint(0, 100, (3, 9))
    labels[1, :4] = -100
    loss = chunked_cross_entropy(hidden, head, labels, chunk=chunk)
    (got,) = torch.autograd.grad(3 * loss, hidden)
    ref = F.cross_entropy(head(hidden[:, :-1]).reshape(-1, 100), labels[:, 1:].reshape(-1))
    (want,) = torch.autograd.grad(3 * ref, hidden)
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(got, want)


def test_rmsnorm_forward_is_bitwise_and_backward_matches():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, requires_grad=True)
    w = torch.randn(64, requires_grad=True)
    y = _RMSNormFn.apply(x, w, 1e-5)
    ref = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(y, ref)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, (x, w), g), torch.autograd.grad(ref, (x, w), g), strict=True):
        torch.testing.assert_close(a, b)


def test_rope_and_silu_gate_match_autograd():
    torch.manual_seed(0)
    q = torch.randn(2, 5, 3, 8, dtype=torch.float64).transpose(1, 2).requires_grad_()  # [B, H, S, D] view
    cos, sin = torch.randn(2, 1, 5, 8, dtype=torch.float64), torch.randn(2, 1, 5, 8, dtype=torch.float64)
    torch.testing.assert_close(_RopeFn.apply(q, cos, sin), q * cos + rotate_half(q) * sin)
    assert torch.autograd.gradcheck(lambda t: _RopeFn.apply(t, cos, sin), (q,))
    gate = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    up = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_SiluMulFn.apply, (gate, up))


def test_rebuilt_saved_tensors_give_the_same_gradients(tiny):
    """Training rebuilds norm outputs and the MLP product in backward; checkpointing-off vs a plain run."""
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, dropout=0.0))
    g = randomize_adapter(model, "a", seed=1)
    params = set_trainable_params(model, "a")
    ids = torch.randint(0, 49152, (2, 10), generator=g)
    model.train()
    loss = model(ids, labels=ids)  # training: recompute=True inside
    got = torch.autograd.grad(loss, params)
    x = model.model.embed_tokens(ids)
    cos, sin = model.rope(torch.arange(10).expand(2, 10), x.dtype)
    for layer in model.model.layers:
        x = layer(x, cos, sin, None, None, None, None, recompute=False)
    ref = chunked_cross_entropy(model.model.norm(x), model.lm_head, ids)
    torch.testing.assert_close(loss, ref)
    for a, b in zip(got, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(a, b)
