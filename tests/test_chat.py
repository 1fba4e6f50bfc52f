"""`loraforge chat` driven through a pipe: adapters switch instantly, /base turns them off, /reset forgets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from loraforge.cli.chat import HELP
from loraforge.generate import SamplingParams, generate
from loraforge.lora import LoraConfig, add_lora, save_adapter, set_adapter

ROOT = Path(__file__).resolve().parents[1]


def random_adapter(model, name, path, seed):
    torch.manual_seed(seed)
    add_lora(model, name, LoraConfig(r=4, alpha=8, dropout=0.0), activate=False)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if f".lora_B.{name}" in key:
                p.normal_(0, 0.5)
    save_adapter(model, name, path)


def test_chat_switches_adapters_through_a_pipe(tmp_path, tiny, tiny_folder):
    model, tok = tiny
    random_adapter(model, "pirate", tmp_path / "pirate", seed=1)
    random_adapter(model, "butler", tmp_path / "butler", seed=2)
    params = SamplingParams(max_new_tokens=6)

    def reply(name, history):
        set_adapter(model, name)
        return generate(model, tok, [history], params)[0].strip()

    hi = [{"role": "user", "content": "Hello!"}]
    expect = {n: reply(n, hi) for n in ("pirate", "butler", None)}
    assert len(set(expect.values())) == 3, "the adapters should answer differently"
    # the second turn of a conversation sees the first one
    again = hi + [{"role": "assistant", "content": expect["butler"]}, {"role": "user", "content": "Again?"}]
    second = reply("butler", again)

    script = "Hello!\n/adapter butler\n/reset\nHello!\nAgain?\n/base\n/reset\nHello!\n/adapter nobody\n/help\n" \
             "/reset\n/adapter pirate\nHello!\n/quit\nnever read\n"
    proc = subprocess.run(
        [sys.executable, "-m", "loraforge", "chat", "--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32",
         "--adapter", f"pirate={tmp_path / 'pirate'}", "--adapter", f"butler={tmp_path / 'butler'}",
         "--max-new-tokens", "6"],
        input=script, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ), timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = [
        f"pirate> {expect['pirate']}",  # the first adapter starts active
        "# adapter butler",
        "# history cleared",
        f"butler> {expect['butler']}",
        f"butler> {second}",
        "# base model (adapters off)",
        "# history cleared",
        f"base> {expect[None]}",
        "# no adapter 'nobody'; loaded: pirate, butler",
        HELP,
        "# history cleared",
        "# adapter pirate",
        f"pirate> {expect['pirate']}",
    ]
    assert proc.stdout == "".join(line + "\n" for line in expected)
