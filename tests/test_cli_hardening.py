"""Commands that write folders never destroy the user's files: merge and quantize refuse an --out that holds
their input or is not empty (unless --overwrite, and then only a model folder), outputs take the umask,
and a full disk ends in one sentence with nothing half-written."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter
from test_cli import cli

from loraforge.lora import LoraConfig, add_lora, save_adapter
from loraforge.paths import atomic_write_json, save_safetensors

pytestmark = pytest.mark.usefixtures("isolated_rng")  # leave the global RNGs as they were


@pytest.fixture()
def run_dir(tiny, tmp_path) -> Path:
    """A training run's folder: the adapter at its top, and the run's other files around it."""
    model, _ = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8, targets=["q_proj", "down_proj"]))
    randomize_adapter(model, "a", seed=0, std=0.05)
    run = save_adapter(model, "a", tmp_path / "run")
    (run / "checkpoints" / "step-3").mkdir(parents=True)
    (run / "checkpoints" / "step-3" / "state.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(r: subprocess.CompletedProcess, *words: str) -> str:
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("loraforge: error:"), r.stderr
    for w in words:
        assert w in line, line
    return line


@pytest.mark.parametrize("overwrite", [False, True])
def test_merge_never_deletes_the_run_that_holds_the_adapter(tiny_folder, run_dir, overwrite):
    before = snapshot(run_dir)
    for out in (run_dir, run_dir.parent):  # the run itself, or a folder around it
        r = cli("merge", "--model", str(tiny_folder), "--adapter", str(run_dir), "--out", str(out),
                *(["--overwrite"] if overwrite else []), check=False)
        one_line_error(r, "--out", "holds the input")
        assert snapshot(run_dir) == before


def test_merge_refuses_a_non_empty_out_and_overwrite_replaces_only_a_model_folder(tiny_folder, run_dir, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    args = ("merge", "--model", str(tiny_folder), "--adapter", str(run_dir), "--out")
    one_line_error(cli(*args, str(notes), check=False), "not empty", "--overwrite")
    one_line_error(cli(*args, str(notes), "--overwrite", check=False), "not a model folder")
    assert (notes / "todo.txt").read_text() == "keep me"

    merged = tmp_path / "merged"
    cli(*args, str(merged))
    one_line_error(cli(*args, str(merged), check=False), "not empty")
    first = snapshot(merged)
    cli(*args, str(merged), "--overwrite")  # a model folder, as merge writes: replaced
    assert snapshot(merged).keys() == first.keys()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no work folder left beside it


def test_quantize_refuses_its_own_model_folder_and_a_non_empty_out(tiny_folder, tmp_path):
    before = snapshot(tiny_folder)
    for extra in ([], ["--overwrite"]):
        r = cli("quantize", "--model", str(tiny_folder), "--out", str(tiny_folder), *extra, check=False)
        one_line_error(r, "holds the input")
    assert snapshot(tiny_folder) == before
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    one_line_error(cli("quantize", "--model", str(tiny_folder), "--out", str(busy), check=False), "not empty")


def test_outputs_take_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        save_safetensors({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
        atomic_write_json(tmp_path / "c.json", {})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"w.safetensors": 0o644, "c.json": 0o644}


# -- generate, chat, eval: the first things a new user runs -------------------------------------------------
LONG = " ".join(f"w{i}" for i in range(300))  # ~600 tokens: past the tiny model's 256-position context


def test_generate_refuses_a_prompt_past_the_context_or_truncates_it_from_the_left(tiny, tiny_folder):
    from loraforge.generate import (
        SamplingParams,
        decode_until_stop,
        encode_prompt,
        generate_ids,
        stop_token_ids,
    )

    base = ("generate", "--model", str(tiny_folder), "--max-new-tokens", "4", "--raw", "--prompt", LONG)
    model, tok = tiny
    n = len(encode_prompt(tok, LONG, chat=False))
    assert n > 256
    one_line_error(cli(*base, check=False), f"the prompt is {n} tokens", "context is 256 tokens", "--truncate-prompt")
    r = cli(*base, "--truncate-prompt")
    assert f"kept its last {256 - 4}" in r.stderr
    ids = encode_prompt(tok, LONG, chat=False)[-(256 - 4):]
    eos = stop_token_ids(model, tok)
    (new,) = generate_ids(model, [ids], SamplingParams(max_new_tokens=4), eos)
    assert r.stdout == decode_until_stop(tok, new, eos, [])[0] + "\n"


def test_generate_system_prompt(tiny, tiny_folder):
    from loraforge.generate import SamplingParams, generate

    model, tok = tiny
    r = cli("generate", "--model", str(tiny_folder), "--max-new-tokens", "6", "--prompt", "Hello",
            "--system", "Answer in French.")
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hello"}]
    assert r.stdout == generate(model, tok, [msgs], SamplingParams(max_new_tokens=6))[0] + "\n"


def test_every_option_of_every_command_has_help_and_shows_its_default():
    import argparse

    from loraforge.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not (a.help or "").strip()]
    assert missing == []
    def shown(command: str, flag: str) -> str:  # the help line argparse prints for the flag
        p = sub.choices[command]
        action = next(a for a in p._actions if flag in a.option_strings)
        return p._get_formatter()._expand_help(action)

    for command, flag, default in (("generate", "--max-new-tokens", "128"), ("generate", "--top-p", "1.0"),
                                   ("generate", "--top-k", "0"), ("serve", "--host", "127.0.0.1"),
                                   ("serve", "--port", "8000")):
        assert f"(default: {default})" in shown(command, flag), (command, flag)
    assert "seed" in shown("generate", "--seed")
    chat = sub.choices["chat"].format_help()
    for command in ("/adapter NAME", "/base", "/reset", "/help", "/quit"):
        assert command in chat


def test_chat_on_a_terminal_has_line_editing(tiny_folder):
    """The Up arrow is history (readline), not the characters ^[[A sent to the model as a message."""
    import pty
    import select
    import sys

    master, slave = pty.openpty()  # a terminal on stdin and stdout, as input() needs for readline
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "chat", "--model", str(tiny_folder),
                             "--max-new-tokens", "2"], stdin=slave, stdout=slave, stderr=subprocess.PIPE,
                            env={**os.environ, "TERM": "xterm"})
    os.close(slave)
    out = b""
    try:
        os.write(master, b"\x1b[A/quit\n/quit\n")
        deadline = time.monotonic() + 120
        while (proc.poll() is None or select.select([master], [], [], 0)[0]) and time.monotonic() < deadline:
            if select.select([master], [], [], 1)[0]:
                try:
                    out += os.read(master, 4096)
                except OSError:  # the other end closed
                    break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    assert proc.returncode == 0, proc.stderr.read()
    assert b"base> " not in out, out  # the line was /quit, not a message to answer


def test_eval_writes_one_prediction_per_record(tmp_path, tiny, tiny_folder):
    import json

    from loraforge.generate import SamplingParams, generate
    from loraforge.lora import set_adapter

    model, tok = tiny
    add_lora(model, "a", LoraConfig(r=4, alpha=8))
    randomize_adapter(model, "a", seed=3, std=0.3)
    adapter = save_adapter(model, "a", tmp_path / "adapter")
    questions = ["Name a colour.", "Count to two.", "Say hi."]
    params = SamplingParams(max_new_tokens=4)
    answers = [generate(model, tok, [[{"role": "user", "content": q}]], params)[0] for q in questions]
    with set_adapter_off(model, set_adapter):
        base_answers = [generate(model, tok, [[{"role": "user", "content": q}]], params)[0] for q in questions]
    refs = [answers[0], answers[1], "something else"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in zip(questions, refs, strict=True)))
    preds = tmp_path / "out" / "preds.jsonl"
    cli("eval", str(data), "--adapter", str(adapter), "--model", str(tiny_folder), "--max-new-tokens", "4",
        "--predictions", str(preds))
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [[{"role": "user", "content": q}] for q in questions]
    assert [r["reference"] for r in rows] == refs
    assert [r["prediction"] for r in rows] == answers and [r["base_prediction"] for r in rows] == base_answers
    assert [r["exact"] for r in rows] == [a.strip() == ref.strip() for a, ref in zip(answers, refs, strict=True)]
    assert [r["exact"] for r in rows][:2] == [True, True] and rows[2]["exact"] is False


class set_adapter_off:
    def __init__(self, model, set_adapter):
        self.model, self.set_adapter = model, set_adapter

    def __enter__(self):
        self.set_adapter(self.model, None)

    def __exit__(self, *exc):
        self.set_adapter(self.model, "a")


def test_a_bad_flag_is_named_as_the_flag(tmp_path, capsys):
    from loraforge.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hi"}\n')
    assert main(["train", str(data), "--out", str(tmp_path / "o"), "--rank", "0"]) == 2
    assert capsys.readouterr().err.strip() == "loraforge: error: --rank 0: must be at least 1"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("rank: 0\n")
    assert main(["train", str(data), "--out", str(tmp_path / "o"), "--config", str(cfg)]) == 2
    assert capsys.readouterr().err.strip() == f"loraforge: error: {cfg}: rank 0: must be at least 1"
    assert main(["train", str(data), "--out", str(tmp_path / "o"), "--config", str(cfg), "--lr", "-1",
                 "--rank", "2"]) == 2
    assert capsys.readouterr().err.strip() == "loraforge: error: --lr -1.0: must be positive"
