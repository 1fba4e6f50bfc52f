"""Training checkpoints: everything needed to continue a run exactly where it stopped.

    DIR/checkpoints/step-N/
        trainable.safetensors   the trained tensors, by name (Trainable.params)
        optimizer.safetensors   AdamW's moments and step count, keyed "<param name>/<state key>"
        rng.safetensors         torch's CPU (and CUDA) generator states
        state.json              step, data sampler position, best validation loss, Python/NumPy RNG
                                states, the run's config

A run on several processes writes its trained tensors and optimizer state sharded, through
torch.distributed.checkpoint (see sharded.py); either kind resumes on any number of processes.

Each folder is written beside its final name and renamed into place, so a run killed at any moment
leaves only whole checkpoints; deletion renames first for the same reason. Tensors go through
safetensors and everything else through JSON: loading a checkpoint never unpickles anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import LoraForgeError
from ..paths import atomic_dir, atomic_write_json, save_safetensors
from . import sharded

log = logging.getLogger("loraforge")

CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under out/checkpoints, oldest first."""
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.fullmatch(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(out: Path) -> Path | None:
    found = checkpoints(out)
    return found[-1][1] if found else None


def latest_intact_checkpoint(out: Path) -> Path | None:
    """The newest checkpoint whose files all read back whole (None: there is no checkpoint).

    A disk that filled up, or a copy cut short, can leave the newest checkpoint truncated although its
    folder is complete; resuming falls back to the one before it, and says so.
    """
    skipped: list[str] = []
    for _, path in reversed(checkpoints(out)):
        try:
            verify_checkpoint(path)
        except LoraForgeError as e:
            skipped.append(str(e))
            continue
        if skipped:
            log.warning("resuming from %s, the newest intact checkpoint; skipped %d damaged one%s (%s)", path,
                        len(skipped), "s" * (len(skipped) > 1), skipped[0])
        return path
    if skipped:
        raise LoraForgeError(f"{Path(out) / CHECKPOINTS}: no intact checkpoint to resume from (newest: {skipped[0]})")
    return None


def verify_checkpoint(path: Path) -> None:
    """Raise LoraForgeError unless state.json and every tensor file of checkpoint `path` read back whole."""
    state = read_state(path)
    if sharded.is_sharded(path):
        sharded.verify(path)
        for rank in range(_processes(state)):
            _load_tensors(path, sharded.rng_file(rank))
        return
    for name in TENSOR_FILES:
        _load_tensors(path, name)


def _processes(state: dict[str, Any]) -> int:
    n = state.get("processes", 1)
    return n if isinstance(n, int) and n >= 1 else 1


def remove_stale(out: Path) -> None:
    """Delete the half-written and half-deleted folders a killed run leaves (names starting with '.')."""
    root = Path(out) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith("."):
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    out: Path,
    step: int,
    params: dict[str, torch.nn.Parameter],
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    keep: int,
    dist=None,
) -> Path:
    """Write checkpoint `step` (state: JSON-able trainer state) and keep only the newest `keep`.

    dist: the process group's view (train.distributed.Dist); with several processes every rank calls this
    and writes its shards, and rank 0 the rest."""
    dest = Path(out) / CHECKPOINTS / f"step-{step}"
    if dist is not None and dist.active:
        _save_sharded(dest, step, params, optimizer, state, dist)
        if dist.main:
            _prune(out, keep)
        dist.barrier()  # no rank goes on (or gets killed by a test) before the checkpoint is in place
        return dest
    with atomic_dir(dest) as tmp:
        save_safetensors({n: p.detach().cpu() for n, p in params.items()}, tmp / "trainable.safetensors")
        save_safetensors(optimizer_tensors(optimizer, params), tmp / "optimizer.safetensors")
        save_safetensors(torch_rng_state(), tmp / "rng.safetensors")
        atomic_write_json(tmp / "state.json", {**state, "step": step, "python_rng": python_rng_state()})
    _prune(out, keep)
    return dest


def _save_sharded(dest: Path, step: int, params, optimizer, state: dict[str, Any], dist) -> None:
    with contextlib.ExitStack() as stack:
        # rank 0 owns the folder (made beside dest, renamed into place at the end); the others write into it
        tmp = stack.enter_context(atomic_dir(dest)) if dist.main else None
        tmp = Path(dist.broadcast(str(tmp) if dist.main else ""))
        sharded.save(tmp, params, optimizer)
        save_safetensors(torch_rng_state(), tmp / sharded.rng_file(dist.rank))
        dist.barrier()
        if dist.main:  # state.json last: it marks the checkpoint complete
            atomic_write_json(tmp / "state.json", {**state, "step": step, "processes": dist.world,
                                                    "python_rng": python_rng_state()})


def _prune(out: Path, keep: int) -> None:
    for _, old in checkpoints(out)[:-keep]:
        doomed = old.with_name(f".{old.name}.deleting")
        os.rename(old, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


TENSOR_FILES = ("trainable.safetensors", "optimizer.safetensors", "rng.safetensors")
# The fields of state.json that resuming reads, and their JSON types.
STATE_FIELDS = {"step": int, "sampler": dict, "tokens": int, "python_rng": dict, "config": dict}


def read_state(path: Path) -> dict[str, Any]:
    file = Path(path) / "state.json"
    try:
        state = json.loads(file.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise LoraForgeError(f"{file}: unreadable checkpoint state ({e}); delete the checkpoint to resume from "
                             "an earlier one") from None
    if not isinstance(state, dict):
        raise LoraForgeError(f"{file}: expected a JSON object, got {type(state).__name__}; delete the checkpoint "
                             "to resume from an earlier one")
    for key, kind in STATE_FIELDS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            what = "missing" if key not in state else f"not {'an integer' if kind is int else 'an object'}"
            raise LoraForgeError(f"{file}: field {key!r} is {what}, so the checkpoint cannot be resumed; delete "
                                 "it to resume from an earlier one")
    return state


def _load_tensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path) / name
    try:
        return load_file(str(file))
    except (OSError, ValueError, SafetensorError) as e:
        raise LoraForgeError(f"{file}: unreadable ({e}); delete the checkpoint to resume from an earlier one") from None


def load_checkpoint(
    path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer, dist=None
) -> dict[str, Any]:
    """Restore trained tensors, optimizer state and RNG states from `path`; return its state.json.

    Either kind of checkpoint loads into a run on any number of processes. torch's generator (dropout's)
    comes back only for the process count that saved it; with another count each rank keeps its fresh
    per-rank seed, and state["rng_restored"] is False."""
    state = read_state(path)
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    same_count = _processes(state) == world
    if sharded.is_sharded(path):
        sharded.load(path, params, optimizer)
        rng = _load_tensors(path, sharded.rng_file(rank)) if same_count else None
    else:
        rng = _load_whole(path, params, optimizer)
        rng = rng if same_count else None
    if rng is not None:
        set_torch_rng_state(rng)
    set_python_rng_state(state.pop("python_rng"))
    state["rng_restored"] = rng is not None
    return state


def _load_whole(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer):
    """A single-process checkpoint's tensors into this run's (whole or sharded); returns its RNG tensors."""
    trained, opt, rng = (_load_tensors(path, name) for name in TENSOR_FILES)
    if set(trained) != set(params):
        missing = sorted(set(params) ^ set(trained))[:3]
        raise LoraForgeError(
            f"{path}: the checkpoint's trained tensors differ from this run's ({', '.join(missing)} ...); "
            "resume with the same method, model, rank and targets"
        )
    with torch.no_grad():
        for name, p in params.items():
            if trained[name].shape != p.shape:
                raise LoraForgeError(f"{path}: {name} has shape {list(trained[name].shape)} in the checkpoint, "
                                     f"{list(p.shape)} in this run; resume with the same rank")
            _assign(p, trained[name])
    if any(_is_sharded_tensor(p) for p in params.values()):
        sharded.init_optimizer_state(optimizer)
        names = {id(p): n for n, p in params.items()}
        with torch.no_grad():
            for p, st in optimizer.state.items():
                for key, v in st.items():
                    _assign(v, opt[f"{names[id(p)]}/{key}"])
    else:
        load_optimizer_tensors(optimizer, params, opt)
    return rng


def _is_sharded_tensor(t: torch.Tensor) -> bool:
    return hasattr(t, "device_mesh")


def _assign(dst: torch.Tensor, whole: torch.Tensor) -> None:
    """dst <- whole; a sharded dst takes its own shard of it."""
    if _is_sharded_tensor(dst):
        from torch.distributed.tensor import distribute_tensor

        # src_data_rank=None: every rank holds `whole` already, each just cuts out its piece
        piece = distribute_tensor(whole.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(piece.to_local())
    else:
        dst.copy_(whole)


# -- optimizer ----------------------------------------------------------------------------------------------
def optimizer_tensors(optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in params.items()}
    out = {}
    for p, st in optimizer.state.items():
        for key, v in st.items():
            out[f"{names[id(p)]}/{key}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
    return out


def load_optimizer_tensors(
    optimizer: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], tensors: dict[str, torch.Tensor]
) -> None:
    # Through load_state_dict, which casts moments to each parameter's device and dtype; the hyper-
    # parameters stay this run's (the learning rate is set from the schedule at every step anyway).
    names = {id(p): n for n, p in params.items()}
    sd = optimizer.state_dict()
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    sd["state"] = {}
    for i, name in enumerate(order):
        st = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
        if st:
            sd["state"][i] = st
    optimizer.load_state_dict(sd)


# -- random number generators -------------------------------------------------------------------------------
def torch_rng_state() -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_torch_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k[5:]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def python_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"random": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def set_python_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
