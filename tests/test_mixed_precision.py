"""Mixed precision: whole training steps with bf16 base weights (what `--dtype auto` picks on a CPU with
fast bf16, and on CUDA) and under CPU bf16 autocast (a user's own loop, fp32 weights), for LoRA, QLoRA and
prefix tuning, with and without gradient checkpointing, at the default dropout. The loss tracks the fp32
run's, the trained weights and the optimizer state stay fp32, and the frozen base is stored in bf16.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter
from safetensors.torch import load_file
from test_train import chat_data

from loraforge.ops.compiled import force_compiled
from loraforge.train import TrainConfig, train

STEPS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return chat_data(tmp_path_factory.mktemp("data") / "colors.jsonl")


def run(data, tiny_folder, out, method, dtype, ckpt) -> list[float]:
    cfg = TrainConfig(data=str(data), model=str(tiny_folder), out=str(out), device="cpu", dtype=dtype, method=method,
                      rank=4, alpha=8, num_virtual_tokens=4, batch_size=4, max_steps=STEPS,
                      lr=3e-2 if method == "prefix" else 1e-2, eval_every=0, save_every=0, max_len=128, seed=0,
                      grad_checkpointing=ckpt)
    assert cfg.dropout == 0.05 or method == "prefix"  # the default dropout: the fused path must take it
    res = train(cfg)
    for p in res.model.parameters():
        if p.requires_grad:
            assert p.dtype == torch.float32  # fp32 master weights
    base = res.model.model.embed_tokens.weight
    assert base.dtype == {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "val_loss" not in r]


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad-ckpt"])
def test_bf16_base_training_tracks_fp32(tmp_path, data, tiny_folder, method, ckpt):
    fp32 = run(data, tiny_folder, tmp_path / "fp32", method, "float32", ckpt)
    bf16 = run(data, tiny_folder, tmp_path / "bf16", method, "bfloat16", ckpt)
    assert len(fp32) == len(bf16) == STEPS
    for a, b in zip(fp32, bf16, strict=True):
        assert abs(a - b) <= 0.03 * abs(a), (fp32, bf16)
    assert bf16[-1] < bf16[0]  # it learns
    tensors = load_file(str(tmp_path / "bf16" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # saved in fp32, as PEFT writes adapters


def _tiny_trainable(tiny_folder, method: str, dtype: str):
    """(the tiny model with adapter "a" (LoRA r=4 at the default dropout, on an NF4 base for qlora) or prefix
    "p", its trainable parameters)."""
    from loraforge import LoraConfig, add_lora, load_model, set_trainable_params
    from loraforge.prefix import PrefixConfig, add_prefix, set_trainable_prefix

    model, _ = load_model(str(tiny_folder), device="cpu", dtype=dtype, quantize="nf4" if method == "qlora" else None)
    if method == "prefix":
        add_prefix(model, "p", PrefixConfig(num_virtual_tokens=4))
        return model, set_trainable_prefix(model, "p")
    add_lora(model, "a", LoraConfig(r=4, alpha=8))  # default dropout 0.05
    return model, set_trainable_params(model, "a")


@pytest.mark.parametrize(("method", "ckpt"), [("lora", False), ("lora", True), ("qlora", False), ("prefix", True)],
                         ids=["lora", "lora-grad-ckpt", "qlora", "prefix-grad-ckpt"])
def test_compiled_kernels_give_the_eager_ops_gradients(tiny_folder, method, ckpt):
    """A bf16 training step with the compiled kernels (ops/compiled.py, forced on for the tiny model's small
    tensors) gives the eager ops' loss and gradients, up to bf16 rounding, with the same dropout masks."""
    from loraforge.prefix import prefix_for, prefix_kwargs

    model, params = _tiny_trainable(tiny_folder, method, "bfloat16")
    if method != "prefix":
        randomize_adapter(model, "a", seed=1)  # B != 0: every projection's gradient flows through the adapter
    model.gradient_checkpointing = ckpt
    model.train()
    ids = torch.randint(0, 200, (2, 24), generator=torch.Generator().manual_seed(1))
    kw = prefix_kwargs(prefix_for(model, "p", 2)) if method == "prefix" else {}

    def step(compiled: bool):
        torch.manual_seed(0)  # the same masks
        with force_compiled(compiled, min_numel=0):
            loss = model(ids, labels=ids, **kw)
            return loss, torch.autograd.grad(loss, params)

    (eager_loss, eager), (loss, grads) = step(False), step(True)
    assert abs(loss.item() - eager_loss.item()) <= 1e-3 * eager_loss.item()
    # The two bf16 paths round in different places: gradients measured up to 2.5% apart (of each one's
    # largest element). A 10% error in one of the SiLU gate's two gradients shows as 13%.
    for a, b in zip(grads, eager, strict=True):
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()
        assert err <= 5e-2, err


@pytest.mark.parametrize("method", ["lora", "qlora", "prefix"])
@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "grad-ckpt"])
def test_training_steps_under_cpu_autocast_track_fp32(tiny_folder, method, ckpt):
    """A user's own loop: fp32 weights, torch.autocast("cpu", bfloat16) around the forward."""
    from loraforge.prefix import prefix_for, prefix_kwargs

    def losses(autocast: bool) -> list[float]:
        torch.manual_seed(0)
        model, params = _tiny_trainable(tiny_folder, method, "float32")
        model.gradient_checkpointing = ckpt
        model.train()
        opt = torch.optim.AdamW(params, lr=1e-2)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(STEPS):
            ids = torch.randint(0, 200, (2, 16), generator=g)
            kw = prefix_kwargs(prefix_for(model, "p", 2)) if method == "prefix" else {}
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(ids, labels=ids, **kw)
            assert loss.dtype == torch.float32
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(float(loss.detach()))
        return out

    ref, got = losses(False), losses(True)
    for a, b in zip(ref, got, strict=True):
        assert abs(a - b) <= 0.03 * abs(a), (ref, got)


def test_dtype_auto_follows_the_cpu_verdict_and_the_load_line_says_why(tiny_folder, tmp_path, monkeypatch):
    """`--dtype auto` on CPU is bf16 exactly when a timed product shows bf16 fast here; the verdict is cached
    per CPU in $LORAFORGE_HOME, and the CLI's load line names the dtype and the reason."""
    import os
    import subprocess
    import sys

    from loraforge.model.precision import FAST_RATIO, cpu_bf16_verdict, resolve_precision

    monkeypatch.setenv("LORAFORGE_HOME", str(tmp_path))
    verdict = cpu_bf16_verdict()
    assert json.loads((tmp_path / "cpu_bf16.json").read_text())  # cached
    need = 1.0 if "AMX" in verdict["capability"] else FAST_RATIO
    assert verdict["fast"] == (verdict["ratio"] is not None and verdict["ratio"] >= need)
    prec = resolve_precision("cpu", "auto")
    assert prec.dtype == (torch.bfloat16 if verdict["fast"] else torch.float32) and prec.why.startswith("auto")
    assert resolve_precision("cpu", None).dtype == torch.float32  # the library default stays fp32
    r = subprocess.run([sys.executable, "-m", "loraforge", "generate", "--model", str(tiny_folder), "--raw",
                        "--prompt", "hi", "--max-new-tokens", "2"], capture_output=True, text=True,
                       env=dict(os.environ, LORAFORGE_HOME=str(tmp_path)), timeout=300)
    assert r.returncode == 0, r.stderr
    want = "bfloat16" if verdict["fast"] else "float32"
    line = next(ln for ln in r.stderr.splitlines() if "loaded" in ln)
    assert f"{want} on cpu" in line and "auto:" in line, line


def test_save_dtype_bf16_halves_the_adapter_and_loads_back(tmp_path, data, tiny_folder):
    from loraforge import load_model
    from loraforge.adapters import attach_adapter

    cfg = TrainConfig(data=str(data), model=str(tiny_folder), out=str(tmp_path / "r"), device="cpu", dtype="float32",
                      rank=4, alpha=8, batch_size=4, max_steps=2, eval_every=0, save_every=0, save_dtype="bfloat16")
    res = train(cfg)
    tensors = load_file(str(tmp_path / "r" / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    attach_adapter(model, tmp_path / "r", "x")  # a loaded adapter takes the model's compute dtype
    ours = dict(res.model.named_parameters())
    loaded = {n[: -len(".x")]: p for n, p in model.named_parameters() if n.endswith(".x")}
    assert loaded and len(loaded) == len(tensors)
    for name, p in loaded.items():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, ours[name + ".default"].detach().to(torch.bfloat16).float())
