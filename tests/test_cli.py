"""The first commands, run as a user would: `loraforge info`, `generate`, `merge`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_adapter
from transformers import AutoModelForCausalLM

from loraforge.lora import LoraConfig, add_lora, save_adapter


def cli(*args, check=True):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "loraforge", *args], capture_output=True, text=True, env=env,
                       timeout=300)
    if check and r.returncode != 0:
        raise AssertionError(f"loraforge {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
    return r


@pytest.fixture()
def tiny_adapter(tiny, tmp_path):
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize_adapter(model, "a", seed=0, std=0.05)
    return save_adapter(model, "a", tmp_path / "adapter")


def test_help_lists_commands():
    out = cli("--help").stdout
    for cmd in ("info", "generate", "merge"):
        assert cmd in out
    assert "--model" in cli("generate", "--help").stdout


def test_info_model_and_adapter(tiny_folder, tiny_adapter):
    info = json.loads(cli("info", str(tiny_folder), "--json").stdout)
    assert info["architecture"] == "LlamaForCausalLM" and info["layers"] == 2
    assert info["parameters"] == sum(
        p.numel() for p in AutoModelForCausalLM.from_pretrained(str(tiny_folder)).parameters())
    ad = json.loads(cli("info", str(tiny_adapter), "--json").stdout)
    assert ad["method"] == "LORA" and ad["rank"] == 4 and sorted(ad["targets"]) == ["down_proj", "q_proj"]
    assert ad["size_on_disk_bytes"] > 0


def test_user_errors_are_one_line(tmp_path):
    r = cli("generate", "--prompt", "hi", "--model", str(tmp_path / "missing"), check=False)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("loraforge: error:") and "Traceback" not in r.stderr
    r = cli("info", str(tmp_path), check=False)
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr


def test_merge_writes_a_folder_plain_transformers_loads(tiny, tiny_folder, tiny_adapter, tmp_path):
    cli("merge", "--model", str(tiny_folder), "--adapter", str(tiny_adapter), "--out", str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    model, _ = tiny
    from loraforge.lora import load_adapter

    load_adapter(model, tiny_adapter)
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids), atol=1e-4, rtol=1e-5)
    assert (tmp_path / "merged" / "tokenizer.json").exists()


def test_generate_with_adapter_differs_from_base(tiny_folder, tiny_adapter):
    args = ("generate", "--model", str(tiny_folder), "--prompt", "Hello there", "--max-new-tokens", "8")
    base = cli(*args).stdout
    adapted = cli(*args, "--adapter", str(tiny_adapter)).stdout
    assert base != adapted


@pytest.mark.embedded
def test_embedded_model_answers_the_capital_of_france():
    r = cli("generate", "--prompt", "What is the capital of France?", "--max-new-tokens", "20")
    assert "Paris" in r.stdout
    assert r.stdout.count("\n") <= 2  # the completion and nothing else on stdout
    assert "SmolLM2-135M-Instruct" in r.stderr and "134.5M parameters" in r.stderr
