"""OpenAI-compatible servers as subprocesses, for bench/bench_serve.py and the interop suite: `loraforge
serve` and vLLM CPU (the venv interop/setup_vllm.sh builds), each on a free local port, waited for on
/health and stopped with its whole process group (vLLM runs its engine in a child process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


def interop_cache() -> Path:
    return Path(os.environ.get("LORAFORGE_INTEROP_CACHE", Path.home() / ".cache/loraforge/interop"))


def vllm_python() -> Path:
    """The vLLM venv's interpreter (it may not exist: interop/setup_vllm.sh makes it)."""
    return interop_cache() / "vllm-venv" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def vllm_command(model: Path, port: int, adapters: dict[str, Path], *, max_rank: int, max_loras: int,
                 max_num_seqs: int = 8, max_model_len: int = 512, dtype: str = "float32") -> list[str]:
    """vLLM's OpenAI server on a local HF folder with LoRA (fp32 unless `dtype`); the base is served as "base"."""
    cmd = [str(vllm_python()), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
           "--port", str(port), "--model", str(model), "--served-model-name", "base",
           "--dtype", dtype, "--enforce-eager", "--max-model-len", str(max_model_len),
           "--max-num-seqs", str(max_num_seqs), "--enable-lora", "--max-lora-rank", str(max_rank),
           "--max-loras", str(max_loras)]
    if adapters:
        cmd += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return cmd


def vllm_env(threads: int | None = None) -> dict[str, str]:
    """The server's environment. `threads`: bind vLLM's OpenMP threads to CPUs 0..threads-1; by default
    vLLM keeps one CPU of this machine's two for its scheduler process and computes on the other."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # vLLM's venv, not ours
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB of KV cache: plenty for a 135M model at a 512-token context
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",  # enables /v1/load_lora_adapter
        VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",  # a local folder; nothing may come from a hub
    )
    if threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    return env


def loraforge_command(model: Path, port: int, adapters: dict[str, Path], *, max_batch: int = 8,
                      max_model_len: int = 512, dtype: str = "float32") -> list[str]:
    cmd = [sys.executable, "-m", "loraforge", "serve", "--model", str(model), "--port", str(port),
           "--host", "127.0.0.1", "--dtype", dtype, "--max-batch", str(max_batch),
           "--max-model-len", str(max_model_len)]
    for name, path in adapters.items():
        cmd += ["--adapter", f"{name}={path}"]
    return cmd


@contextlib.contextmanager
def running(name: str, cmd: list[str], port: int, log: Path, env: dict[str, str] | None = None,
            startup_s: float = 900) -> Iterator[str]:
    """Start `cmd` (a server listening on `port`), wait until /health answers 200, yield its base URL,
    and stop it afterwards. Start-up failures raise RuntimeError with the end of the server's log."""
    import httpx

    with open(log, "w") as out:
        # its own process group, so that stopping it ends the children it started too
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode} during start-up:\n{tail(log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not healthy after {startup_s:.0f}s:\n{tail(log)}")
            time.sleep(2)
        yield base
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (vLLM shuts its engine down), SIGKILL if it lingers."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # a child that outlived its parent
        os.killpg(proc.pid, signal.SIGKILL)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:]
