"""Commands that write folders never destroy the user's files: merge and quantize refuse an --out that holds
their input or is not empty (unless --overwrite, and then only a model folder), outputs take the umask,
and a full disk ends in one sentence with nothing half-written."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import randomize_adapter
from test_cli import cli

from loraforge.lora import LoraConfig, add_lora, save_adapter
from loraforge.paths import atomic_write_json, save_safetensors


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
