"""The trainer under the accidents of real machines: SIGTERM, a full disk, a truncated or empty checkpoint,
work folders left by a killed run; and the run's config.yaml repeats it from anywhere."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_train import ROOT, chat_data, run_train, tiny_cfg

from loraforge.cli import main
from loraforge.errors import LoraForgeError
from loraforge.train import checkpoint as ckpt
from loraforge.train import train
from loraforge.train.checkpoint import checkpoints

pytestmark = pytest.mark.usefixtures("isolated_rng")  # leave the global RNGs as they were


def verify_checkpoint(path: Path) -> None:
    """Every file of the checkpoint reads back whole."""
    import json

    from safetensors.torch import load_file

    assert json.loads((path / "state.json").read_text())["step"] > 0
    for name in ("trainable", "optimizer", "rng"):
        assert load_file(str(path / f"{name}.safetensors"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return chat_data(tmp_path_factory.mktemp("data") / "colors.jsonl")


@pytest.fixture()
def small_disk(tmp_path):
    """A 2 MB tmpfs (we run as root in CI); skipped, saying why, where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk ({(r.stderr or r.stdout).strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the device is full."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as f:  # unbuffered: nothing left to fail at close
        for chunk in (65536, 512):  # then the last partial block
            try:
                while True:
                    f.write(b"\0" * chunk)
            except OSError:
                pass
    return filler


@pytest.mark.reliability
def test_a_full_disk_at_a_checkpoint_is_one_sentence_and_keeps_the_previous_one(tmp_path, data, tiny_folder,
                                                                                   small_disk, monkeypatch, capsys):
    real_save = ckpt.save_checkpoint
    filler = []

    def save_then_fill(*a, **kw):  # the real save; then the disk fills up before the next one
        path = real_save(*a, **kw)
        if not filler:
            filler.append(fill(small_disk))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save_then_fill)
    out = small_disk / "run"
    args = ["train", str(data), "--model", str(tiny_folder), "--device", "cpu", "--out", str(out), "--rank", "4",
            "--max-steps", "4", "--batch-size", "4", "--max-len", "64", "--save-every", "1", "--eval-every", "0",
            "--keep-checkpoints", "2", "--no-progress"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("loraforge: error:") and "no space left on the device" in err[-1], err
    assert "step-1" in err[-1] and "intact" in err[-1]
    assert [s for s, _ in checkpoints(out)] == [1]
    verify_checkpoint(out / "checkpoints" / "step-1")
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]  # no half checkpoint

    filler[0].unlink()  # space again: the run continues from step 1 and finishes
    monkeypatch.setattr(ckpt, "save_checkpoint", real_save)
    assert main([*args, "--resume"]) == 0
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.reliability
@pytest.mark.parametrize("command", ["merge", "quantize"])
def test_merge_and_quantize_to_a_full_disk_leave_no_partial_folder(tiny_folder, tmp_path, small_disk, command):
    from test_cli import cli
    from test_cli_hardening import one_line_error

    extra = []
    if command == "merge":
        from loraforge.lora import LoraConfig, add_lora, save_adapter
        from loraforge.model import load_model

        model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
        add_lora(model, "a", LoraConfig(r=2, targets=["q_proj"]))
        extra = ["--adapter", str(save_adapter(model, "a", tmp_path / "adapter"))]
    r = cli(command, "--model", str(tiny_folder), *extra, "--out", str(small_disk / "out"), check=False)
    one_line_error(r, "no space left on the device", "intact")
    assert list(small_disk.iterdir()) == []


@pytest.mark.reliability
def test_sigterm_stops_training_with_a_message_and_the_last_checkpoint_resumes(tmp_path, data, tiny_folder):
    out = tmp_path / "run"
    args = [str(data), "--model", str(tiny_folder), "--device", "cpu", "--out", str(out), "--rank", "4",
            "--batch-size", "4", "--max-len", "64", "--save-every", "1", "--eval-every", "0", "--no-progress"]
    proc = subprocess.Popen([sys.executable, "-m", "loraforge", "train", *args, "--max-steps", "100000"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while not checkpoints(out):
            assert proc.poll() is None, proc.communicate()[1]
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "loraforge: terminated (SIGTERM)"
    assert "training stopped during step" in err and "is intact (continue with --resume)" in err
    last = checkpoints(out)[-1]
    verify_checkpoint(last[1])
    resumed = run_train(*args, "--max-steps", str(last[0] + 1), "--resume")
    assert f"step-{last[0]}" in resumed.stderr
    assert (out / "adapter_model.safetensors").exists()


@pytest.mark.reliability
def test_resume_skips_a_truncated_newest_checkpoint_and_names_the_one_it_uses(tmp_path, data, tiny_folder, caplog):
    out = tmp_path / "run"
    train(tiny_cfg(data, tiny_folder, out, max_steps=4, save_every=2, eval_every=0))
    newest = out / "checkpoints" / "step-4" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])
    result = train(tiny_cfg(data, tiny_folder, out, max_steps=5, save_every=2, eval_every=0), resume=True)
    assert result.steps == 5
    said = caplog.text
    assert "step-2, the newest intact checkpoint" in said and "optimizer.safetensors" in said


@pytest.mark.parametrize("state", ["{}", "[]", '{"step": "4"}', "{"])
def test_a_broken_checkpoint_state_is_one_sentence(tmp_path, data, tiny_folder, state):
    out = tmp_path / "run"
    train(tiny_cfg(data, tiny_folder, out, max_steps=2, save_every=2, eval_every=0, keep_checkpoints=1))
    (out / "checkpoints" / "step-2" / "state.json").write_text(state)
    with pytest.raises(LoraForgeError, match=r"step-2/state\.json: .*(resume|delete)") as e:
        train(tiny_cfg(data, tiny_folder, out, max_steps=3, eval_every=0), resume=True)
    assert "\n" not in str(e.value) and "no intact checkpoint" in str(e.value)


def test_resume_removes_only_the_work_folders_a_killed_run_left(tmp_path, data, tiny_folder):
    out = tmp_path / "run"
    train(tiny_cfg(data, tiny_folder, out, max_steps=2, save_every=2, eval_every=0))
    ours = [out / ".best.k2j_x9az", out / "..adapter.tmp.0abc12de", out / ".adapter.tmp", out / ".best.old1234"]
    for d in ours:
        d.mkdir()
        (d / "adapter_model.safetensors").write_bytes(b"half")
    theirs = [out / ".bestiary", out / ".best.notes", out / "..adapter.tmp.keep-me"]
    for d in theirs:
        d.mkdir()
    train(tiny_cfg(data, tiny_folder, out, max_steps=3, save_every=2, eval_every=0), resume=True)
    assert [d for d in ours if d.exists()] == []
    assert all(d.exists() for d in theirs)


def test_config_yaml_records_absolute_paths(tmp_path, data, tiny_folder, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.symlink(data, tmp_path / "d.jsonl")
    (tmp_path / "val.jsonl").write_bytes(Path(data).read_bytes())
    train(tiny_cfg("d.jsonl", os.path.relpath(tiny_folder), "run", val="val.jsonl", max_steps=1, eval_every=0))
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["data"] == str(tmp_path / "d.jsonl") and cfg["val"] == str(tmp_path / "val.jsonl")
    assert cfg["out"] == str(tmp_path / "run") and cfg["model"] == str(tiny_folder)


def test_a_checkpoint_sampler_state_without_its_position_is_one_sentence(tmp_path, data, tiny_folder):
    import json

    out = tmp_path / "run"
    train(tiny_cfg(data, tiny_folder, out, max_steps=2, save_every=2, eval_every=0, keep_checkpoints=1))
    state_file = out / "checkpoints" / "step-2" / "state.json"
    state = json.loads(state_file.read_text())
    del state["sampler"]["epoch"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(LoraForgeError, match="sampler state has no valid epoch and step"):
        train(tiny_cfg(data, tiny_folder, out, max_steps=3, eval_every=0), resume=True)
