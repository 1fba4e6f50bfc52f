"""Every fused op in loraforge.ops equals its plain reference, forward and backward, in fp32, with bf16
tensors, and under CPU bf16 autocast; and the one switch runs the references everywhere.

The precisions: fp32 against the reference run in float64 (tight), bf16 against the float64 reference
at bf16's resolution (8 mantissa bits: ~1e-2 relative).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import randomize_adapter

from loraforge import ops
from loraforge.lora import LoraConfig, add_lora, set_trainable_params
from loraforge.model.loss import chunked_cross_entropy
from loraforge.ops.compiled import MIN_NUMEL, Kernel, force_compiled

MODES = ["fp32", "bf16", "autocast"]
KERNELS = ["eager", "compiled"]  # the ops' own eager code, or their torch.compile kernels (ops/compiled.py)


def _kernels(which: str):
    """The compiled kernels forced on whatever the tensors' size (they start at MIN_NUMEL otherwise), or off."""
    return force_compiled(which == "compiled", min_numel=0)


def _ctx(mode: str):
    return torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext()


def _close(got: torch.Tensor, want: torch.Tensor, mode: str, what: str = "output") -> None:
    """Within the precision's resolution of the result's scale (the largest |value|): a few fp32 ulps, or a
    few bf16 roundings (2^-8 each) of the operands and of the products' outputs."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape, what
    scale = want.abs().max().clamp(min=1e-6)
    err = (got - want).abs().max() / scale
    assert err <= (1e-5 if mode == "fp32" else 2.5e-2), f"{what}: max error {err:.2e} of the scale {scale:.3g}"


def _inputs(mode: str, *shapes, grad=True, seed=0):
    """Seeded tensors: bf16 storage in "bf16" mode, fp32 otherwise (autocast casts inside the ops)."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.bfloat16 if mode == "bf16" else torch.float32
    return [torch.randn(s, generator=g).to(dt).requires_grad_(grad) for s in shapes]


def _compare(fused_fn, ref_fn, inputs, mode: str, grad_of=None):
    """Forward and backward of fused_fn(*inputs) against ref_fn on float64 copies of the inputs."""
    grad_of = grad_of if grad_of is not None else [i for i, t in enumerate(inputs) if t.requires_grad]
    with _ctx(mode):
        y = fused_fn(*inputs)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(y.dtype)
    got = torch.autograd.grad(y, [inputs[i] for i in grad_of], g)
    ref_in = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    ref = ref_fn(*ref_in)
    want = torch.autograd.grad(ref, [ref_in[i] for i in grad_of], g.double())
    _close(y, ref, mode)
    for i, a, b in zip(grad_of, got, want, strict=True):
        assert a.dtype == inputs[i].dtype, f"gradient {i} has dtype {a.dtype}, its input {inputs[i].dtype}"
        _close(a, b, mode, f"gradient of input {i}")
    return y


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_rms_norm(mode, kernels):
    x, w = _inputs(mode, (2, 3, 64), (64,))
    with _kernels(kernels):
        y = _compare(lambda x, w: ops.rms_norm(x, w, 1e-5), lambda x, w: ops.rms_norm_ref(x, w, 1e-5), [x, w], mode)
    assert y.dtype == x.dtype  # the weight's dtype equals x's in every mode here


def test_rms_norm_fp32_forward_is_bitwise():
    x, w = _inputs("fp32", (2, 3, 64), (64,))
    assert torch.equal(ops.rms_norm(x, w, 1e-5), ops.rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("mode", MODES)
def test_rope(mode):
    q, k = _inputs(mode, (2, 4, 5, 8), (2, 2, 5, 8))
    cos, sin = (t.transpose(1, 2) for t in _inputs(mode, (2, 5, 1, 8), (2, 5, 1, 8), grad=False, seed=1))
    q = q.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # a [B, H, S, D] view, as in the model
    _compare(lambda q, k: torch.cat([t.flatten() for t in ops.apply_rope(q, k, cos, sin)]),
             lambda q, k: torch.cat([t.flatten() for t in ops.apply_rope_ref(q, k, cos.double(), sin.double())]),
             [q, k], mode)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("mode", MODES)
def test_silu_mul(mode, kernels):
    gate, up = _inputs(mode, (4, 6, 32), (4, 6, 32))
    with _kernels(kernels):
        _compare(ops.silu_mul, ops.silu_mul_ref, [gate, up], mode)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_causal_attention(dtype, heads):
    """16-bit training on CPU: flash attention's forward and the backward of ops/attention.py, against
    float64, within the 16-bit resolution and no further from it than PyTorch's flash attention (the
    reference) is; with grouped query heads and without."""
    H, Hkv = heads
    g = torch.Generator().manual_seed(0)
    q, k, v = ((torch.randn(2, h, 40, 16, generator=g) * 2).to(dtype).requires_grad_() for h in (H, Hkv, Hkv))
    go = torch.randn(2, 40, H, 16, generator=g).to(dtype).transpose(1, 2)  # strided, as o_proj's backward gives it
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    want = ops.causal_attention_ref(*ref_in)
    want_grads = torch.autograd.grad(want, ref_in, go.double())

    def err(a, b):
        return ((a.double() - b).abs().max() / b.abs().max()).item()

    errors = {}
    for name, kernels in (("fused", "compiled"), ("flash", "eager")):
        with _kernels(kernels):
            y = ops.causal_attention(q, k, v)
            grads = torch.autograd.grad(y, (q, k, v), go)
        assert (y.grad_fn.name() == "_CausalAttentionBackward") == (name == "fused")
        assert y.dtype == dtype and all(t.dtype == dtype for t in grads)
        errors[name] = [err(y, want)] + [err(a, b) for a, b in zip(grads, want_grads, strict=True)]
    for fused, flash in zip(errors["fused"], errors["flash"], strict=True):
        assert fused <= max(1.5 * flash, 2**-8), errors


def test_causal_attention_keeps_sdpa_where_the_backward_does_not_pay(monkeypatch):
    """Only 16-bit tensors in a pass that records gradients, of the compiled kernels' size, take the
    batched-product backward; fp32, no_grad and small tensors go to PyTorch's attention itself."""
    from loraforge.ops.attention import _CausalAttention

    taken, real = [], _CausalAttention.apply
    monkeypatch.setattr(_CausalAttention, "apply", lambda *a: taken.append(a[0].dtype) or real(*a))
    q, k, v = (torch.randn(1, h, 8, 16, requires_grad=True) for h in (4, 2, 2))
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    with force_compiled(True, min_numel=0):
        assert torch.equal(ops.causal_attention(q, k, v), ops.causal_attention_ref(q, k, v))  # fp32
        with torch.no_grad():
            ops.causal_attention(qb, kb, vb)
        assert taken == []
        ops.causal_attention(qb, kb, vb)
        assert taken == [torch.bfloat16]
    assert qb.numel() < MIN_NUMEL
    ops.causal_attention(qb, kb, vb)  # below the size the kernels start at
    assert taken == [torch.bfloat16]


def test_a_kernel_that_does_not_compile_runs_eagerly(caplog):
    """No working C++ compiler: one warning naming the kernel, then the plain functions, same results, and
    the ops stop asking for kernels."""
    import torch._inductor.config as inductor_config

    shift = 1.0 + torch.rand(()).item()  # a graph no cache holds

    def shifted_square(x):
        return x * x + shift

    k, other = Kernel(shifted_square), Kernel(lambda x: x + shift)
    x = torch.randn(100)
    no_compiler = inductor_config.patch({"cpp.cxx": ("/nonexistent/c++",)})
    with no_compiler, force_compiled(True), caplog.at_level("WARNING", logger="loraforge"):
        assert ops.compiled.compiled_kernels(x.bfloat16().requires_grad_())
        assert torch.equal(k(x), x * x + shift)
        assert torch.equal(k(x), x * x + shift) and torch.equal(other(x), x + shift)
        assert not ops.compiled.compiled_kernels(x.bfloat16().requires_grad_())
    warnings = [r.getMessage() for r in caplog.records if "could not build" in r.getMessage()]
    assert len(warnings) == 1 and "shifted_square" in warnings[0] and "C++ compiler" in warnings[0], warnings


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk", [4, 256])
def test_frozen_head_ce(mode, bias, chunk):
    h, = _inputs(mode, (27, 16))
    w, b = _inputs(mode, (100, 16), (100,), grad=False, seed=1)
    b = b if bias else None
    y = torch.randint(0, 100, (27,), generator=torch.Generator().manual_seed(2))
    y[3:7] = ops.IGNORE_INDEX
    _compare(lambda h: ops.frozen_head_ce(h, w, b, y, chunk),
             lambda h: ops.frozen_head_ce_ref(h, w.double(), None if b is None else b.double(), y), [h], mode)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("master_fp32", [False, True])
def test_lora_linear(mode, bias, dropout, master_fp32):
    """y = x W^T + b + s B(A dropout(x)), dropout given as its mask. With fp32 master A and B
    on a bf16 base ("bf16" + master_fp32), products run in bf16 and A, B get fp32 gradients."""
    x, = _inputs(mode, (2, 5, 12))
    W, b = _inputs(mode, (20, 12), (20,), grad=False, seed=1)
    A, B = _inputs("fp32" if master_fp32 else mode, (4, 12), (20, 4), seed=2)
    b = b if bias else None
    keep = ops.dropout_mask(x, 0.3) if dropout else None

    def fused(x, A, B):
        return ops.lora_linear(x, W, b, A, B, 2.5, keep, 0.3)

    def ref(x, A, B):
        return ops.lora_linear_ref(x, W.double(), None if b is None else b.double(), A, B, 2.5, keep, 0.3)

    y = _compare(fused, ref, [x, A, B], mode)
    assert y.dtype == (torch.float32 if mode == "fp32" else torch.bfloat16)


def test_lora_linear_on_a_quantized_base_dequantizes_into_the_compute_dtype():
    from loraforge.quant import QuantLinear

    torch.manual_seed(0)
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32, bias=False), "nf4")
    asked = []

    def dequant(dt):
        asked.append(dt)
        return q.dequantize(dt)

    x = torch.randn(3, 64, requires_grad=True)
    A, B = torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lora_linear(x, None, None, A, B, 2.0, dequant=dequant)
    y.sum().backward()
    assert asked == [torch.bfloat16, torch.bfloat16]  # forward and backward, never fp32 then cast
    ref = ops.lora_linear_ref(x.double(), q.dequantize(torch.float64), None, A.double(), B.double(), 2.0)
    _close(y, ref, "bf16")


@pytest.mark.parametrize("p", [0.05, 0.3])
def test_dropout_mask_keeps_one_minus_p(p):
    """16-bit draws: the keep rate is 1 - p to within sampling noise (n = 2^20: 5 sigma < 0.003), masks
    differ between calls, and a seed repeats them."""
    x = torch.empty(1 << 20)
    torch.manual_seed(0)
    a = ops.dropout_mask(x, p)
    b = ops.dropout_mask(x, p)
    torch.manual_seed(0)
    assert torch.equal(ops.dropout_mask(x, p), a) and not torch.equal(a, b)
    assert abs(a.float().mean().item() - (1 - p)) < 5 * ((p * (1 - p)) / x.numel()) ** 0.5 + 2**-16
    y = ops.dropout_ref(torch.ones(4, 8), torch.ones(4, 8, dtype=torch.bool), p)
    torch.testing.assert_close(y, torch.full((4, 8), 1 / (1 - p)))


def test_dropout_mask_is_0_1_in_the_compute_dtype():
    """The mask is made as the multiplier's 0/1 in the dtype the products run in (bf16 under autocast),
    with the same draws as the bool mask; the fused LoRA op takes either and gives the same result."""
    x = torch.randn(3, 7, 40)
    masks = {}
    for dt in (None, torch.bool, torch.float32, torch.bfloat16, torch.float16):
        torch.manual_seed(3)
        masks[dt] = ops.dropout_mask(x, 0.3, dt)
    assert masks[None].dtype == torch.float32
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert masks[dt].dtype == dt and torch.equal(masks[dt].bool(), masks[torch.bool])
        assert torch.equal(masks[dt], masks[torch.bool].to(dt))  # exactly 0 and 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ops.dropout_mask(x, 0.3).dtype == torch.bfloat16
    assert ops.dropout_mask(x, 1e-6).all() and not ops.dropout_mask(x, 1 - 1e-6).any()  # p rounds to 0 / 1
    W, A, B = torch.randn(9, 40), torch.randn(4, 40), torch.randn(9, 4)
    for dt in (torch.float32, torch.bfloat16):
        xd, Ad, Bd = (t.to(dt).requires_grad_() for t in (x, A, B))
        got = [ops.lora_linear(xd, W.to(dt), None, Ad, Bd, 2.0, masks[k], 0.3) for k in (dt, torch.bool)]
        torch.testing.assert_close(got[0], got[1], atol=0, rtol=0)
        grads = [torch.autograd.grad(y.sum(), (xd, Ad, Bd)) for y in got]
        for a, b in zip(*grads, strict=True):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_frozen_linear_is_f_linear():
    x = torch.randn(8, 48)
    w, b = torch.randn(96, 48), torch.randn(96)
    with torch.no_grad():
        torch.testing.assert_close(ops.frozen_linear(x, w, b), torch.nn.functional.linear(x, w, b))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: F.linear's own dtype rule
            assert ops.frozen_linear(x, w, b).dtype == torch.bfloat16


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_the_switch_runs_references(tiny_folder, monkeypatch, quantize, dropout):
    """use_reference() sends the whole model through the *_ref functions and gives the fused ops' loss and
    gradients (LoRA and QLoRA training, dropout, recomputed saved tensors)."""
    from loraforge.model import load_model

    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize=quantize)
    add_lora(model, "a", LoraConfig(r=4, dropout=dropout))
    g = randomize_adapter(model, "a", seed=1)
    params = set_trainable_params(model, "a")
    ids = torch.randint(0, 49152, (2, 10), generator=g)
    model.train()

    def loss_and_grads():
        torch.manual_seed(5)  # the same dropout masks in both runs
        loss = model(ids, labels=ids)
        return loss, torch.autograd.grad(loss, params)

    loss, fused = loss_and_grads()
    names = ("rms_norm_ref", "apply_rope_ref", "silu_mul_ref", "lora_linear_ref", "frozen_head_ce_ref",
             "causal_attention_ref")
    called = set()
    for name in names:
        mod = getattr(ops, name).__module__

        def spy(*a, _n=name, _f=getattr(ops, name), **k):
            called.add(_n)
            return _f(*a, **k)

        monkeypatch.setattr(f"{mod}.{name}", spy)
    with ops.use_reference():
        ref_loss, ref = loss_and_grads()
    assert called == set(names)
    torch.testing.assert_close(loss, ref_loss)
    # fp32 rounding only: at dropout 0.1 the reference's own gradients are 2.6e-6 from a float64 run of it
    # (largest element; the fused ones 1.8e-6), so the two fp32 runs may differ by that much
    for a, b in zip(fused, ref, strict=True):
        torch.testing.assert_close(a, b, atol=5e-6, rtol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_rebuilt_saved_tensors_give_the_same_gradients(tiny_folder, dtype, kernels):
    """Training rebuilds norm outputs and the MLP product in backward (RecomputeSaved); a plain run keeps
    them. The rebuild runs with grad mode off, yet takes the forward's kernels (bf16 with kernels forced on:
    the compiled ones): the gradients are the same bit for bit."""
    from loraforge.model import load_model

    model, _ = load_model(str(tiny_folder), device="cpu", dtype=dtype)
    add_lora(model, "a", LoraConfig(r=4, dropout=0.0))
    g = randomize_adapter(model, "a", seed=1)
    params = set_trainable_params(model, "a")
    ids = torch.randint(0, 49152, (2, 10), generator=g)
    model.train()
    with _kernels(kernels):
        loss = model(ids, labels=ids)  # training: recompute=True inside
        got = torch.autograd.grad(loss, params)
        x = model.model.embed_tokens(ids)
        cos, sin = model.rope(torch.arange(10).expand(2, 10), x.dtype)
        for layer in model.model.layers:
            x = layer(x, cos, sin, None, None, None, None, recompute=False)
        ref = chunked_cross_entropy(model.model.norm(x), model.lm_head, ids)
        want = torch.autograd.grad(ref, params)
    assert torch.equal(loss, ref)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
