"""Training on several processes (gloo on CPU): 2 processes give the adapter 1 process gives with the same
global batch, for DDP and FSDP2 and for LoRA, QLoRA and prefix tuning; checkpoints resume across process
counts; a killed rank stops the job with one line and leaves the last checkpoint whole; `--nproc 2` from
the command line.

The ranks are forked from the test process (no second import of torch and transformers per rank), each
with torchrun's environment, and call `train` as torchrun's would.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraforge.errors import LoraForgeError
from loraforge.train import TrainConfig, train
from loraforge.train.checkpoint import checkpoints, read_state, verify_checkpoint
from loraforge.train.trainer import KILL_ENV, KILL_RANK_ENV

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    # 22 rows (24 records, 2 held out): the last global batch of 4 is short, and rank 1 gets no row of it
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    colors = ["red", "green", "blue", "gold"]
    with open(path, "w") as f:
        for i in range(24):
            msgs = [{"role": "user", "content": f"Color of item {i}?"},
                    {"role": "assistant", "content": f"Item {i} is {colors[i % 4]} and number {i * 7}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def cfg_for(data, tiny_folder, out, **kw) -> TrainConfig:
    # dropout 0 and fp32: the two runs may differ only by the order of float sums
    base = dict(data=str(data), model=str(tiny_folder), out=str(out), device="cpu", dtype="float32", rank=4, alpha=8,
                dropout=0.0, batch_size=4, max_steps=3, lr=1e-2, eval_every=0, save_every=0, max_len=96, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, job, env: dict, report: Path) -> None:
    torch.set_num_threads(1)  # a forked child must not reuse the parent's OpenMP pool
    os.environ.update(env)
    if world > 1:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    code, msg = 0, "ok"
    try:
        msg = job() or msg
    except LoraForgeError as e:
        code, msg = 2, str(e)
    except BaseException as e:  # noqa: BLE001 - reported to the test, which fails on it
        code, msg = 1, f"{type(e).__name__}: {e}"
    report.write_text(msg)
    os._exit(code)


def run_ranks(world: int, cfg: TrainConfig | None, resume: bool = False, env: dict | None = None,
              job=None, where: Path | None = None) -> list[tuple[int, str]]:
    """Run `train(cfg)` (or `job()`) on `world` forked processes; [(exit code, "ok", the job's result or the
    error)] per rank."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    port = _free_port()
    job = job or (lambda: train(cfg, resume=resume, progress=False) and None)
    where = where or Path(cfg.out).parent
    reports = [where / f".rank{r}-{os.getpid()}-{port}.txt" for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, job, env or {}, reports[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
            p.join()
    out = [(p.exitcode, reports[r].read_text() if reports[r].exists() else "") for r, p in enumerate(procs)]
    for f in reports:
        f.unlink(missing_ok=True)
    return out


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], atol=1e-5, rtol=1e-5, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(scope="module")
def one_process(data, tiny_folder, tmp_path_factory):
    """The 1-process reference adapter per method (batch 4), trained once for the module."""
    done: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in done:
            out = tmp_path_factory.mktemp("ref") / method
            [(code, msg)] = run_ranks(1, cfg_for(data, tiny_folder, out, method=method))
            assert code == 0, msg
            done[method] = out
        return done[method]

    return get


@pytest.mark.parametrize(("strategy", "method", "batch", "accum"), [
    ("ddp", "lora", 2, 1), ("fsdp", "lora", 1, 2), ("fsdp", "qlora", 2, 1), ("ddp", "qlora", 1, 2),
    ("ddp", "prefix", 2, 1), ("fsdp", "prefix", 2, 1)])
def test_two_processes_train_the_adapter_one_process_trains(strategy, method, batch, accum, data, tiny_folder,
                                                            tmp_path, one_process):
    """2 processes x batch 2 (or x batch 1 x 2 accumulated micro-batches) = batch 4 on one process: the same
    global batches, the loss normalised by the global token count (not a mean of the ranks' means),
    gradients summed over ranks, and over micro-batches without a sync in between."""
    out = tmp_path / "two"
    results = run_ranks(2, cfg_for(data, tiny_folder, out, method=method, batch_size=batch, grad_accum=accum,
                                   strategy=strategy))
    assert results == [(0, "ok"), (0, "ok")]
    assert_same_adapter(one_process(method), out)
    # the step log is rank 0's alone, and counts the tokens of both ranks
    def steps(folder: Path) -> list[dict]:
        return [r for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    one, two = steps(one_process(method)), steps(out)
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)


def test_qlora_under_fsdp_shards_the_nf4_codes(tiny_folder, tmp_path):
    """The packed 4-bit codes become frozen uint8 parameters that FSDP2 cuts in two (each rank holds half);
    all-gathered for the forward, they give the unsharded model's output."""
    from loraforge.model import load_model
    from loraforge.train import distributed

    ids = torch.tensor([[1, 5, 9, 200, 3000, 7]])
    model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")
    with torch.no_grad():
        want = model(ids)[:, -1]
    full_codes = model.model.layers[0].self_attn.q_proj.weight.numel()

    def job():
        dist, _, _ = distributed.setup("cpu")
        m, _ = load_model(str(tiny_folder), device="cpu", dtype="float32", quantize="nf4")
        distributed.wrap(m, "fsdp", dist, {})
        w = m.model.layers[0].self_attn.q_proj.weight
        assert w.dtype == torch.uint8 and hasattr(w, "device_mesh") and not w.requires_grad
        with torch.no_grad():
            got = m(ids)[:, -1]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        return str(w.to_local().numel())

    results = run_ranks(2, None, job=job, where=tmp_path)
    assert [c for c, _ in results] == [0, 0], results
    assert [int(m) for _, m in results] == [full_codes // 2, full_codes // 2]


def test_resume_across_process_counts(data, tiny_folder, tmp_path, one_process):
    """2 processes (FSDP) stop after checkpoint 2 of 4, 1 process resumes; and 1 stops, 2 (DDP) resume:
    both end where an uninterrupted 1-process run of 4 steps ends."""
    ref = tmp_path / "ref"
    [(code, msg)] = run_ranks(1, cfg_for(data, tiny_folder, ref, max_steps=4))
    assert code == 0, msg

    kw = dict(max_steps=4, save_every=2)
    a = tmp_path / "two-then-one"
    assert [c for c, _ in run_ranks(2, cfg_for(data, tiny_folder, a, batch_size=2, strategy="fsdp", **kw),
                                    env={KILL_ENV: "2"})] == [-9, -9]
    assert [s for s, _ in checkpoints(a)] == [2] and read_state(a / "checkpoints/step-2")["processes"] == 2
    assert (a / "checkpoints/step-2/state/.metadata").is_file()  # DCP's sharded layout
    [(code, msg)] = run_ranks(1, cfg_for(data, tiny_folder, a, **kw), resume=True)
    assert code == 0, msg
    assert_same_adapter(ref, a)

    b = tmp_path / "one-then-two"
    assert [c for c, _ in run_ranks(1, cfg_for(data, tiny_folder, b, **kw), env={KILL_ENV: "2"})] == [-9]
    assert (b / "checkpoints/step-2/trainable.safetensors").is_file()  # the single-process layout
    assert run_ranks(2, cfg_for(data, tiny_folder, b, batch_size=2, strategy="ddp", **kw), resume=True) == \
        [(0, "ok"), (0, "ok")]
    assert_same_adapter(ref, b)


def test_resume_refuses_another_global_batch(data, tiny_folder, tmp_path):
    out = tmp_path / "run"
    [(code, msg)] = run_ranks(1, cfg_for(data, tiny_folder, out, max_steps=2, save_every=1), env={KILL_ENV: "1"})
    assert code == -9
    results = run_ranks(2, cfg_for(data, tiny_folder, out, max_steps=2, save_every=1), resume=True)
    assert [c for c, _ in results] == [2, 2]
    assert "global micro-batches of 4 rows" in results[0][1] and "pass --batch-size 2" in results[0][1]


def test_killed_rank_stops_the_job_with_one_line_and_the_checkpoint_resumes(data, tiny_folder, tmp_path):
    """`loraforge train --nproc 2` as a user runs it: rank 1 is SIGKILLed right after checkpoint 2; the job
    ends with one line naming the intact checkpoint, and `--resume` on 2 processes finishes the run (that
    resuming gives the uninterrupted run's adapter is test_resume_across_process_counts')."""
    args = [str(data), "--model", str(tiny_folder), "--device", "cpu", "--dtype", "float32", "--rank", "4",
            "--alpha", "8", "--dropout", "0", "--max-steps", "4", "--lr", "1e-2", "--eval-every", "0",
            "--save-every", "2", "--max-len", "96", "--seed", "1", "--no-progress"]
    out = tmp_path / "run"

    def cli(*extra, env=None):
        return subprocess.run([sys.executable, "-m", "loraforge", "train", *args, "--batch-size", "2", "--nproc", "2",
                               "--strategy", "fsdp", "--out", str(out), *extra], capture_output=True, text=True,
                              cwd=ROOT, env={**os.environ, **(env or {})}, timeout=400)

    killed = cli(env={KILL_ENV: "2", KILL_RANK_ENV: "1"})
    assert killed.returncode == 2, killed.stderr[-3000:]
    last = killed.stderr.strip().splitlines()[-1]
    assert last.startswith("loraforge: error: training stopped: process 1 of 2 was killed by SIGKILL"), killed.stderr
    assert "step-2, is intact (continue with --resume)" in last
    assert "Traceback" not in killed.stderr
    assert [s for s, _ in checkpoints(out)] == [2]
    verify_checkpoint(out / "checkpoints/step-2")

    resumed = cli("--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines() == [str(out)]  # printed once, by rank 0
    assert resumed.stderr.count("resuming from") == 1  # logged once, by rank 0
    assert "global batch 4 = batch 2 x 2 processes x 1 accumulation" in resumed.stderr
    assert [s for s, _ in checkpoints(out)][-1] == 4 and (out / "adapter_model.safetensors").is_file()


def test_a_rank_data_error_names_the_file_and_line(tiny_folder, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    results = run_ranks(2, replace(cfg_for(bad, tiny_folder, tmp_path / "out"), val_split=0.0))
    assert [c for c, _ in results] == [2, 2]
    assert all(f"{bad}:2" in msg or f"{bad} line 2" in msg for _, msg in results), results
