"""The LoRA layer and adapter management, on a tiny random Llama."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import randomize_adapter

from loraforge.errors import LoraForgeError
from loraforge.lora import (
    LoraConfig,
    LoraLinear,
    adapter_ids_for,
    add_lora,
    delete_adapter,
    disable_adapter,
    get_adapter_params,
    lora_layers,
    merge_adapter,
    registry,
    set_adapter,
    set_trainable_params,
    trainable_report,
    unmerge_adapter,
)

IDS = torch.randint(0, 49152, (3, 10), generator=torch.Generator().manual_seed(0))


randomize = functools.partial(randomize_adapter, std=0.3)


def test_untrained_adapter_changes_nothing(tiny):
    model, _ = tiny
    with torch.no_grad():
        before = model(IDS)
        add_lora(model, "a", LoraConfig(r=4, alpha=8))
        after = model(IDS)
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    # and yet the adapter is there: B is zero, A is not
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert isinstance(layer, LoraLinear)
    assert layer.lora_B["a"].abs().sum() == 0 and layer.lora_A["a"].abs().sum() > 0


@pytest.mark.parametrize("rslora", [False, True])
def test_forward_is_base_plus_scaled_low_rank(tiny, rslora):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, dropout=0.0, use_rslora=rslora))
    randomize(model, "a")
    layer = model.get_submodule("model.layers.1.mlp.up_proj")
    x = torch.randn(2, 5, layer.in_features, dtype=torch.float64)
    A, B, W = (t.double() for t in (layer.lora_A["a"], layer.lora_B["a"], layer.base.weight))
    s = 8 / 2 if rslora else 8 / 4
    with torch.no_grad():
        got = layer(x.float())
    torch.testing.assert_close(got, (x @ W.T + s * (x @ A.T) @ B.T).float(), atol=1e-5, rtol=1e-5)


def test_gaussian_init_and_scaling_validation():
    with pytest.raises(LoraForgeError, match="rank"):
        LoraConfig(r=0)
    with pytest.raises(LoraForgeError, match="dropout"):
        LoraConfig(dropout=1.5)
    with pytest.raises(LoraForgeError, match="regex"):
        LoraConfig(targets="(")


def test_targets_list_regex_all_linear(tiny):
    model, _ = tiny
    paths = add_lora(model, "a", LoraConfig(targets=["q_proj", "v_proj"]))
    assert sorted({p.rsplit(".", 1)[1] for p in paths}) == ["q_proj", "v_proj"] and len(paths) == 4
    paths = add_lora(model, "b", LoraConfig(targets=r"model\.layers\.1\.mlp\..*"))
    assert paths == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    paths = add_lora(model, "c", LoraConfig(targets="all-linear"))
    assert len(paths) == 14 and "lm_head" not in paths
    with pytest.raises(LoraForgeError, match="match no linear layer"):
        add_lora(model, "d", LoraConfig(targets=["nope"]))


def test_switch_is_a_pointer_and_disable_runs_the_base(tiny):
    model, _ = tiny
    with torch.no_grad():
        base = model(IDS)
    add_lora(model, "a", LoraConfig(r=4))
    add_lora(model, "b", LoraConfig(r=8))
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    weights_before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    with torch.no_grad():
        set_adapter(model, "a")
        out_a = model(IDS)
        set_adapter(model, "b")
        out_b = model(IDS)
        with disable_adapter(model):
            out_base = model(IDS)
        assert registry(model).active == "b"
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == weights_before  # nothing copied
    torch.testing.assert_close(out_base, base)
    assert (out_a - base).abs().max() > 1e-3 and (out_b - out_a).abs().max() > 1e-3
    with pytest.raises(LoraForgeError, match="no adapter named 'zzz'"):
        set_adapter(model, "zzz")


def test_delete_adapter(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4))
    add_lora(model, "b", LoraConfig(r=4))
    delete_adapter(model, "a")
    assert registry(model).names == ["b"]
    assert all("a" not in layer.lora_A for _, layer in lora_layers(model))
    with pytest.raises(LoraForgeError):
        delete_adapter(model, "a")


def test_mixed_batch_equals_each_row_alone(tiny):
    model, _ = tiny
    for i, name in enumerate(["a", "b", "c"]):
        add_lora(model, name, LoraConfig(r=2 + 2 * i, alpha=16, targets="all-linear" if i != 1 else ["q_proj"]))
        randomize(model, name, i)
    rows = ["b", None, "a", "c", "a"]
    ids = torch.randint(0, 49152, (len(rows), 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = model(ids, adapter_ids=adapter_ids_for(model, rows))
        for i, name in enumerate(rows):
            if name is None:
                with disable_adapter(model):
                    alone = model(ids[i:i + 1])
            else:
                set_adapter(model, name)
                alone = model(ids[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=3e-4, rtol=1e-5)  # fp32 rounding: bmm vs mm, F.linear


def test_mixed_batch_trains_each_rows_adapter(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=2))
    add_lora(model, "b", LoraConfig(r=2))
    for n in ("a", "b"):
        set_trainable_params(model, n)
    for _, layer in lora_layers(model):
        for n in ("a", "b"):
            layer.lora_A[n].requires_grad_(True)
            layer.lora_B[n].requires_grad_(True)
    loss = model(IDS[:2], adapter_ids=adapter_ids_for(model, ["a", None]), labels=IDS[:2])
    loss.backward()
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.lora_B["a"].grad is not None and q.lora_B["a"].grad.abs().sum() > 0
    assert q.lora_B["b"].grad is None or q.lora_B["b"].grad.abs().sum() == 0


def test_merge_unmerge_round_trip(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8))
    randomize(model, "a")
    w0 = {p: layer.base.weight.detach().clone() for p, layer in lora_layers(model)}
    with torch.no_grad():
        unmerged = model(IDS)
        merge_adapter(model)
        merged = model(IDS)
        assert any((layer.base.weight - w0[p]).abs().max() > 0 for p, layer in lora_layers(model))
        with pytest.raises(LoraForgeError, match="merged"):
            set_adapter(model, None)
        unmerge_adapter(model)
        again = model(IDS)
    # logits here are O(10): 1e-4 is fp32 rounding of W + s*BA vs Wx + s*B(Ax)
    torch.testing.assert_close(merged, unmerged, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(again, unmerged, atol=1e-4, rtol=1e-5)
    for p, layer in lora_layers(model):
        torch.testing.assert_close(layer.base.weight, w0[p], atol=1e-6, rtol=0)


def test_merge_refuses_non_finite(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4))
    randomize(model, "a")
    q = model.get_submodule("model.layers.1.self_attn.v_proj")
    with torch.no_grad():
        q.lora_B["a"][0, 0] = float("nan")
    w0 = {p: layer.base.weight.detach().clone() for p, layer in lora_layers(model)}
    with pytest.raises(LoraForgeError, match="non-finite"):
        merge_adapter(model)
    for p, layer in lora_layers(model):
        assert torch.equal(layer.base.weight, w0[p])
    assert registry(model).merged is None


def test_optimizer_step_changes_only_the_adapter(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, dropout=0.1))
    params = set_trainable_params(model, "a")
    frozen = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    lora_before = {k: v.detach().clone() for k, v in model.state_dict().items() if ".lora_" in k}
    model.train()
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(2):
        loss = model(IDS, labels=IDS)
        loss.backward()
        opt.step()
        opt.zero_grad()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in lora_before.items())
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)


def test_output_dtype_follows_input(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4))
    layer = model.get_submodule("model.layers.0.mlp.down_proj").to(torch.bfloat16)
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16


def _bf16_layer_with_adapters(model, names=("a", "b")):
    for i, name in enumerate(names):
        add_lora(model, name, LoraConfig(r=4 + 4 * i, alpha=16))
        randomize(model, name, i)
    model.to(torch.bfloat16)
    return model.get_submodule("model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("tokens", [1, 8, 64, 65, 200])
def test_bf16_cpu_inference_delta(tiny, tokens):
    """A 16-bit model on CPU: up to 64 tokens the low-rank products run in fp32 and the sum is rounded once
    into the 16-bit output (decoding); from 65 tokens on they run in bf16 like the base product."""
    from loraforge.lora.layer import FP32_DELTA_MAX_TOKENS

    model, _ = tiny
    layer = _bf16_layer_with_adapters(model)
    set_adapter(model, "b")
    x = torch.randn(1, tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens)).to(torch.bfloat16)
    A, B, s = layer.lora_A["b"], layer.lora_B["b"], layer.scaling["b"]
    with torch.no_grad():
        got = layer(x)
        base = layer.base(x)
        if tokens <= FP32_DELTA_MAX_TOKENS:
            want = (base.float() + (x.float() @ A.float().t()) @ (B.float() * s).t()).to(torch.bfloat16)
            torch.testing.assert_close(got, want, atol=0, rtol=0)
        else:
            want = base + ((x @ A.t()) * s) @ B.t()
            torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        # the 16-bit path, for scale: the fp32 one is never further from the fp32 truth than its rounding
        truth = base.float() + (x.float() @ A.float().t()) @ (B.float() * s).t()
        assert (got.float() - truth).abs().max() <= truth.abs().max() * 2 ** -7
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast keeps the 16-bit products
            torch.testing.assert_close(layer(x), base + ((x @ A.t()) * s) @ B.t(), atol=2e-2, rtol=2e-2)


def test_bf16_cpu_mixed_batch_equals_each_row_alone(tiny):
    """Decoding a mixed batch in bf16 on CPU (fp32 low-rank products, grouped by adapter) gives each row what
    it gets alone on its active adapter, to one bf16 rounding."""
    model, _ = tiny
    layer = _bf16_layer_with_adapters(model, ("a", "b", "c"))
    rows = ["b", None, "a", "c", "a"]
    x = torch.randn(len(rows), 1, layer.in_features, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    with torch.no_grad():
        ids = adapter_ids_for(model, rows)
        mixed = layer(x, ids)
        assert torch.equal(layer(x, ids), mixed)  # the cached grouping, reached through the same ids tensor
        assert torch.equal(layer(x, ids.clone()), mixed)  # and through equal ids
        for i, name in enumerate(rows):
            if name is None:
                alone = layer.base(x[i:i + 1])
            else:
                set_adapter(model, name)
                alone = layer(x[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-2, rtol=2 ** -7)
        # a weight written in place is seen by the next mixed forward, though the ids tensor is the same
        layer.lora_B["a"].mul_(2)
        assert not torch.equal(layer(x, ids)[2], mixed[2])


def test_mixed_batch_reads_side_by_side_adapters_without_copying(tiny):
    """Rows in any order on adapters that sit side by side in the stack: the grouping reads their weights
    through views of the stack (a server's rows come in arrival order), and the result is each row's own."""
    model, _ = tiny
    for i, name in enumerate(["a", "b", "c"]):
        add_lora(model, name, LoraConfig(r=4, alpha=8))
        randomize(model, name, i)
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    rows = ["c", "a", "b", "a"]
    x = torch.randn(len(rows), 1, layer.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ids = adapter_ids_for(model, rows)
        mixed = layer(x, ids)
        plan = layer._groups(ids, x.device)
        A_all, _ = layer._stacked()
        assert plan.At.untyped_storage().data_ptr() == A_all.untyped_storage().data_ptr()
        for i, name in enumerate(rows):
            set_adapter(model, name)
            torch.testing.assert_close(mixed[i:i + 1], layer(x[i:i + 1]), atol=1e-5, rtol=1e-5)


def test_trainable_report(tiny):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, targets=["q_proj"]))
    set_trainable_params(model, "a")
    n = sum(p.numel() for p in get_adapter_params(model, "a").values())
    assert n == 2 * 4 * (32 + 32)
    report = trainable_report(model)
    assert report.startswith("trainable 512 of ") and "%" in report


def test_adapter_names_validated(tiny):
    model, _ = tiny
    add_lora(model, "a")
    with pytest.raises(LoraForgeError, match="already exists"):
        add_lora(model, "a")
    with pytest.raises(LoraForgeError, match="no adapter named"):
        adapter_ids_for(model, ["a", "b"])


def test_lora_only_operations_refuse_a_prefix_adapter(tiny, tmp_path):
    from loraforge.lora import save_adapter
    from loraforge.prefix import PrefixConfig, add_prefix

    model, _ = tiny
    add_prefix(model, "p", PrefixConfig(num_virtual_tokens=3))
    for call in (lambda: merge_adapter(model, "p"), lambda: save_adapter(model, "p", tmp_path / "x"),
                 lambda: get_adapter_params(model, "p")):
        with pytest.raises(LoraForgeError, match="'p' is a prefix adapter, not LoRA"):
            call()
    assert registry(model).merged is None and not (tmp_path / "x").exists()


def test_mixed_batch_where_some_rows_adapter_is_not_on_a_layer(tiny):
    """Rows in group order with a short group: the padded rows must not leak into the output."""
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, targets=["q_proj"]))
    add_lora(model, "b", LoraConfig(r=2, targets=["v_proj"]))
    randomize(model, "a", 1)
    randomize(model, "b", 2)
    rows = ["b", None, "a"]
    with torch.no_grad():
        mixed = model(IDS, adapter_ids=adapter_ids_for(model, rows))
        for i, name in enumerate(rows):
            set_adapter(model, name)
            torch.testing.assert_close(mixed[i:i + 1], model(IDS[i:i + 1]), atol=1e-4, rtol=1e-5)
