"""The trainer on a tiny random Llama: it learns, touches only the adapter, writes a PEFT folder PEFT loads,
accumulates gradients exactly, stops on NaN, and resumes after SIGKILL to the same adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.errors import LoraForgeError
from loraforge.train import TrainConfig, train
from loraforge.train.checkpoint import checkpoints
from loraforge.train.trainer import KILL_ENV

ROOT = Path(__file__).resolve().parents[1]


def chat_data(path: Path, n: int = 24) -> Path:
    """Short, regular chat records a tiny model can learn a little of in a few steps."""
    colors = ["red", "green", "blue", "gold"]
    with open(path, "w") as f:
        for i in range(n):
            msgs = [{"role": "user", "content": f"Color of item {i}?"},
                    {"role": "assistant", "content": f"Item {i} is {colors[i % 4]}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return chat_data(tmp_path_factory.mktemp("data") / "colors.jsonl")


def tiny_cfg(data, tiny_folder, out, **kw) -> TrainConfig:
    base = dict(data=str(data), model=str(tiny_folder), out=str(out), device="cpu", dtype="float32", rank=4, alpha=8,
                batch_size=4, max_steps=6, lr=1e-2, eval_every=3, save_every=3, max_len=128, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def adapter_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def test_training_lowers_loss_keeps_base_frozen_and_writes_a_peft_folder(tmp_path, data, tiny_folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from loraforge.data import encode_records, read_records
    from loraforge.lora import disable_adapter
    from loraforge.model import load_model
    from loraforge.train.evaluate import mean_loss

    out = tmp_path / "run"
    cfg = tiny_cfg(data, tiny_folder, out, max_steps=16, eval_every=8, save_every=8)
    result = train(cfg)
    model, tok = result.model, result.tokenizer

    # DIR: a PEFT adapter, metrics, a plot, the resolved config, the best adapter, checkpoints
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "loss.png", "config.yaml"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "best" / "adapter_model.safetensors").is_file()
    assert TrainConfig.from_yaml(out / "config.yaml") == cfg
    assert [s for s, _ in checkpoints(out)] == [8, 16]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 17))
    assert [r["step"] for r in records if "val_loss" in r] == [8, 16]
    assert result.steps == 16 and result.val_loss == records[-1]["val_loss"]

    # the loss on the training data went down (scored without dropout, adapter on vs off)
    examples = encode_records(read_records(data), tok, 128)
    with disable_adapter(model):
        before = mean_loss(model, examples, tok.pad_token_id, 8)
    after = mean_loss(model, examples, tok.pad_token_id, 8)
    assert after < before - 0.5, (before, after)

    # frozen weights are bit-for-bit the base's; the adapter moved
    fresh, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    trained = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert trained.keys() == fresh.state_dict().keys()
    for k, v in fresh.state_dict().items():
        assert torch.equal(trained[k], v), k
    assert all(t.abs().max() > 0 for k, t in adapter_tensors(out).items() if "lora_B" in k)

    # PEFT loads the folder onto transformers' model and computes what ours does
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32),
                                   str(out)).eval()
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def test_gradient_accumulation_and_checkpointing_match_one_big_batch(tmp_path, data, tiny_folder):
    """batch 4 x 1 and batch 2 x 2 see the same records per step (one seeded permutation, cut finer);
    with token-weighted accumulation the updates agree to rounding. Gradient checkpointing recomputes
    the same forward, so it must not change them either."""
    kw = dict(max_steps=4, dropout=0.0, eval_every=0, save_every=0)
    a = train(tiny_cfg(data, tiny_folder, tmp_path / "a", batch_size=4, grad_accum=1, **kw))
    b = train(tiny_cfg(data, tiny_folder, tmp_path / "b", batch_size=2, grad_accum=2, grad_checkpointing=True, **kw))
    assert b.model.gradient_checkpointing
    ta, tb = adapter_tensors(a.out), adapter_tensors(b.out)
    assert any(t.abs().max() > 0 for k, t in ta.items() if "lora_B" in k)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-5, rtol=1e-4)


def test_same_seed_same_adapter_other_seed_differs(tmp_path, data, tiny_folder):
    kw = dict(max_steps=2, eval_every=0, save_every=0, dropout=0.1)
    a = adapter_tensors(train(tiny_cfg(data, tiny_folder, tmp_path / "a", **kw)).out)
    b = adapter_tensors(train(tiny_cfg(data, tiny_folder, tmp_path / "b", **kw)).out)
    c = adapter_tensors(train(tiny_cfg(data, tiny_folder, tmp_path / "c", seed=1, **kw)).out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_packing_trains(tmp_path, data, tiny_folder):
    result = train(tiny_cfg(data, tiny_folder, tmp_path / "p", pack=True, max_len=128, max_steps=3, eval_every=0,
                            save_every=0, batch_size=2))
    records = [json.loads(line) for line in (result.out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # packed rows hold several records: more tokens per row than any single record has
    assert steps[0]["tokens"] > 2 * 60
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def run_train(*argv, env=None, check=True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loraforge", "train", *argv], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})}, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_killed_run_resumes_to_the_same_adapter(tmp_path, data, tiny_folder):
    """SIGKILL right after checkpoint 4 of 7 (the trainer kills itself through a test-only variable, so
    the moment is exact), then --resume: the adapter must equal an uninterrupted run's. Dropout is on,
    so the RNG state has to come back too, and validation at step 3 means the best-loss record does."""
    args = [str(data), "--model", str(tiny_folder), "--device", "cpu", "--max-steps", "7", "--batch-size", "4",
            "--rank", "4", "--lr", "1e-2", "--dropout", "0.1", "--save-every", "2", "--eval-every", "3",
            "--keep-checkpoints", "1", "--max-len", "128", "--seed", "3", "--no-progress"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    run_train(*args, "--out", str(whole))

    killed = run_train(*args, "--out", str(broken), env={KILL_ENV: "4"}, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert [s for s, _ in checkpoints(broken)] == [4]
    assert not (broken / "adapter_model.safetensors").exists()

    resumed = run_train(*args, "--out", str(broken), "--resume")
    assert "resuming from" in resumed.stderr and "step-4" in resumed.stderr

    a, b = adapter_tensors(whole), adapter_tensors(broken)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=0)
    # the resumed log is the uninterrupted one: steps 1-4 from before the kill, 5-7 redone identically
    log_a = [json.loads(x) for x in (whole / "metrics.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log_b] == [r["step"] for r in log_a]
    for ra, rb in zip(log_a, log_b, strict=True):
        for key in ("loss", "val_loss", "lr", "tokens"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-5), (ra, rb)
    torch.testing.assert_close(adapter_tensors(broken / "best")["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"],
                               adapter_tensors(whole / "best")["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"],
                               atol=1e-5, rtol=0)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(tmp_path, data, tiny_folder, capsys):
    # lr 1e30: step 1 is finite (lora_B starts at 0), then the adapter's output overflows and the loss is NaN
    out = tmp_path / "nan"
    rc = main(["train", str(data), "--model", str(tiny_folder), "--device", "cpu", "--out", str(out),
               "--max-steps", "6", "--lr", "1e30", "--warmup-steps", "0", "--save-every", "1", "--rank", "4",
               "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith("loraforge: error: step 2: the loss is nan")
    assert "checkpoints/step-1" in err[-1]
    assert [s for s, _ in checkpoints(out)] == [1]
    state = json.loads((out / "checkpoints" / "step-1" / "state.json").read_text())
    assert state["step"] == 1
    assert not (out / "adapter_model.safetensors").exists()


def test_bad_data_is_one_line_and_writes_nothing(tmp_path, tiny_folder, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
                   '{"messages": [{"role": "user", "content": "hi"}]\n')
    out = tmp_path / "out"
    rc = main(["train", str(bad), "--model", str(tiny_folder), "--out", str(out), "--max-steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"loraforge: error: {bad}:2: not valid JSON")
    assert not out.exists()


def test_fresh_run_refuses_a_used_folder_and_resume_checks_settings(tmp_path, data, tiny_folder):
    out = tmp_path / "run"
    train(tiny_cfg(data, tiny_folder, out, max_steps=2, eval_every=0, save_every=1))
    with pytest.raises(LoraForgeError, match="already exists and is not empty; pass --resume"):
        train(tiny_cfg(data, tiny_folder, out, max_steps=2))
    with pytest.raises(LoraForgeError, match="--resume: rank was 4 .* this run has 8"):
        train(tiny_cfg(data, tiny_folder, out, max_steps=4, rank=8), resume=True)
    # a longer run may continue a finished one
    result = train(tiny_cfg(data, tiny_folder, out, max_steps=3, eval_every=0, save_every=1), resume=True)
    assert result.steps == 3


def test_qlora_trains_on_an_nf4_base(tmp_path, data, tiny_folder):
    from loraforge.data import encode_records, read_records
    from loraforge.lora import disable_adapter
    from loraforge.model import load_model
    from loraforge.train.evaluate import mean_loss

    try:
        load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")
    except ImportError as e:
        pytest.skip(f"NF4 loading (load_model(quantize='nf4'), loraforge.quant) has not landed yet: {e}")
    result = train(tiny_cfg(data, tiny_folder, tmp_path / "q", method="qlora", max_steps=8, eval_every=0,
                            save_every=0))
    model, tok = result.model, result.tokenizer
    quantized = [n for n, m in model.named_modules() if getattr(m, "quant_type", None) == "nf4"]
    assert quantized, "the base should be NF4"
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    examples = encode_records(read_records(data), tok, 128)
    with disable_adapter(model):
        before = mean_loss(model, examples, tok.pad_token_id, 8)
    assert mean_loss(model, examples, tok.pad_token_id, 8) < before - 0.3
    assert json.loads((result.out / "adapter_config.json").read_text())["peft_type"] == "LORA"
