"""`loraforge train --method prefix` and `loraforge eval` on a prefix adapter, on a tiny random Llama."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loraforge.cli import main
from loraforge.data import encode_records, read_records
from loraforge.lora import disable_adapter
from loraforge.model import load_model
from loraforge.prefix import load_prefix_adapter
from loraforge.train import TrainConfig, train
from loraforge.train.evaluate import mean_loss


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Short, regular chat records a tiny model learns a little of in a few steps."""
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    colors = ["red", "green", "blue", "gold"]
    with open(path, "w") as f:
        for i in range(24):
            msgs = [{"role": "user", "content": f"Color of item {i}?"},
                    {"role": "assistant", "content": f"Item {i} is {colors[i % 4]}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def tiny_cfg(data, tiny_folder, out, **kw) -> TrainConfig:
    base = dict(data=str(data), model=str(tiny_folder), out=str(out), device="cpu", dtype="float32", method="prefix",
                num_virtual_tokens=4, batch_size=4, lr=3e-2, eval_every=0, save_every=0, max_len=128, seed=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("projection", [False, True], ids=["table", "mlp"])
def test_prefix_training_learns_and_writes_a_folder_peft_loads(tmp_path, data, tiny_folder, projection):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    result = train(tiny_cfg(data, tiny_folder, out, prefix_projection=projection, max_steps=8))
    model, tok = result.model, result.tokenizer
    examples = encode_records(read_records(data), tok, 128)
    after = mean_loss(model, examples, tok.pad_token_id, 8)  # the active prefix applies without batch_kwargs
    with disable_adapter(model):
        before = mean_loss(model, examples, tok.pad_token_id, 8)
    assert after < before - 0.3, (before, after)

    # only the prefix trained; the folder is PEFT's format with the MLP folded away
    fresh, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    for k, v in fresh.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PREFIX_TUNING" and cfg["prefix_projection"] is False
    assert list(load_file(str(out / "adapter_model.safetensors"))) == ["prompt_embeddings"]

    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32),
                                   str(out)).eval()
    ids = torch.tensor([examples[0].input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, prefix=model.prefix_adapters["default"](1)), hf(ids).logits,
                                   atol=1e-4, rtol=1e-4)
    # the saved folder gives what the trained model gives, with or without the MLP it was trained through
    load_prefix_adapter(fresh, out, "saved")
    assert mean_loss(fresh, examples, tok.pad_token_id, 8) == pytest.approx(after, abs=1e-5)


def test_eval_scores_a_prefix_adapter(tmp_path, data, tiny_folder, capsys):
    train(tiny_cfg(data, tiny_folder, tmp_path / "run", max_steps=4))
    argv = ["eval", str(data), "--adapter", str(tmp_path / "run"), "--model", str(tiny_folder), "--limit", "4",
            "--max-new-tokens", "4", "--dtype", "float32", "--json", str(tmp_path / "scores.json")]
    assert main(argv) == 0
    scores = json.loads((tmp_path / "scores.json").read_text())
    model, tok = load_model(str(tiny_folder), device="cpu", dtype="float32")
    examples = encode_records(read_records(data)[:4], tok, 1024)
    base = mean_loss(model, examples, tok.pad_token_id, 8)
    load_prefix_adapter(model, tmp_path / "run")
    with_prefix = mean_loss(model, examples, tok.pad_token_id, 8)
    assert scores["base"]["loss"] == pytest.approx(base, abs=1e-5)
    assert scores["adapter"]["loss"] == pytest.approx(with_prefix, abs=1e-5)
    assert with_prefix < base
