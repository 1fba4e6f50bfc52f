"""`loraforge eval`: base vs adapter loss, perplexity and exact match, checked against independent
computations (transformers' loss; the model's own unbatched greedy answers as references)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from loraforge.cli import main
from loraforge.data import encode_records, read_records
from loraforge.generate import SamplingParams, generate
from loraforge.lora import LoraConfig, add_lora, save_adapter


def make_adapter(model, path, seed=0):
    """A LoRA adapter with random (nonzero) B, so it changes the model's outputs."""
    torch.manual_seed(seed)
    add_lora(model, "tmp", LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.5)
    save_adapter(model, "tmp", path)
    return path


def write_chat(path, pairs):
    with open(path, "w") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n")
    return path


@pytest.fixture()
def adapter_dir(tmp_path, tiny_folder):
    from loraforge.model import load_model

    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
    return make_adapter(model, tmp_path / "adapter")


def test_eval_json_has_keys_in_range_and_loss_matches_transformers(tmp_path, tiny_folder, adapter_dir, capsys):
    from transformers import AutoModelForCausalLM

    data = write_chat(tmp_path / "d.jsonl", [(f"Name a number above {i}.", f"{i + 1}") for i in range(6)]
                      + [("Say hi.", "Hi there, how are you today?")])
    out = tmp_path / "scores.json"
    rc = main(["eval", str(data), "--adapter", str(adapter_dir), "--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32",
               "--json", str(out), "--max-new-tokens", "4", "--batch-size", "3", "--limit", "6"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "base" in table and "adapter" in table and "exact match" in table and "(6 records)" in table
    scores = json.loads(out.read_text())
    assert set(scores["base"]) == set(scores["adapter"]) == {"loss", "perplexity", "exact_match"}
    for side in ("base", "adapter"):
        s = scores[side]
        assert 0 <= s["exact_match"] <= 1
        assert s["loss"] > 0 and s["perplexity"] == pytest.approx(math.exp(s["loss"]), rel=1e-9)
    assert scores["base"]["loss"] != pytest.approx(scores["adapter"]["loss"], rel=1e-3)
    assert scores["records"] == 6  # --limit

    # The base loss is the token-weighted loss over the trained (assistant) tokens; compute it with
    # transformers, one record at a time.
    from loraforge.model import load_tokenizer

    tok = load_tokenizer(tiny_folder)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32).eval()
    total, count = 0.0, 0
    for ex in encode_records(read_records(data)[:6], tok, 1024):
        labels = torch.tensor([ex.labels])
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            total += float(hf(torch.tensor([ex.input_ids]), labels=labels).loss) * n
        count += n
    assert scores["base"]["loss"] == pytest.approx(total / count, rel=1e-4)


def test_exact_match_is_one_when_references_are_the_models_own_answers(tmp_path, tiny, tiny_folder, adapter_dir):
    """References made by generating each prompt alone: batched, left-padded generation in eval must
    reproduce them, so the adapter side scores 1.0 and the (different) base side less."""
    from loraforge.adapters import attach_adapter

    model, tok = tiny
    attach_adapter(model, adapter_dir, "a")
    questions = ["Hi.", "What is two plus two, roughly?", "Name a colour.", "Tell me something long and winding."]
    params = SamplingParams(max_new_tokens=5)
    answers = [generate(model, tok, [[{"role": "user", "content": q}]], params)[0] for q in questions]
    assert len(set(answers)) > 1
    data = write_chat(tmp_path / "own.jsonl", list(zip(questions, answers, strict=True)))
    out = tmp_path / "s.json"
    rc = main(["eval", str(data), "--adapter", str(adapter_dir), "--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32",
               "--json", str(out), "--max-new-tokens", "5", "--batch-size", "4"])
    assert rc == 0
    scores = json.loads(out.read_text())
    assert scores["adapter"]["exact_match"] == 1.0
    assert scores["base"]["exact_match"] < 1.0


def test_eval_of_a_missing_adapter_is_one_line(tmp_path, tiny_folder, capsys):
    data = write_chat(tmp_path / "d.jsonl", [("a", "b")])
    rc = main(["eval", str(data), "--adapter", str(tmp_path / "nope"), "--model", str(tiny_folder)])
    assert rc == 2
    assert capsys.readouterr().err.strip().endswith("nope: no such adapter folder")
