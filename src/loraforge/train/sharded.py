"""Checkpoints of a run on several processes, through torch.distributed.checkpoint (DCP).

    DIR/checkpoints/step-N/
        state/                  DCP: the trained tensors ("trainable.<name>") and AdamW's state
                                ("optimizer.<name>/<key>"), each rank writing its own shards
        rng-<rank>.safetensors  each rank's torch generator (dropout is drawn per rank)
        state.json              as for one process, plus "processes"

DCP reshards on load, so such a checkpoint resumes on any number of processes, one included; a
single-process checkpoint (whole tensors in safetensors, see checkpoint.py) resumes on several.

DCP stores its index (`state/.metadata`) pickled. It is read here through an unpickler that builds only
DCP's own metadata records, torch sizes and dtypes, so loading a checkpoint still cannot run code.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from ..errors import LoraForgeError

STATE = "state"


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def is_sharded(path: Path) -> bool:
    return (Path(path) / STATE).is_dir()


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """AdamW's state as its first step creates it (zero moments shaped, and sharded, like each parameter), so
    that DCP has tensors to load into."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not optimizer.state.get(p):
                optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                      "exp_avg_sq": torch.zeros_like(p)}


def _state_dict(params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> dict:
    names = {id(p): n for n, p in params.items()}
    opt = {f"{names[id(p)]}/{k}": v for p, st in optimizer.state.items() for k, v in st.items()}
    return {"trainable": dict(params), "optimizer": opt}


def save(folder: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the trained tensors and AdamW's state into folder/state (collective)."""
    import torch.distributed.checkpoint as dcp

    with torch.no_grad():
        sd = _state_dict(params, optimizer)
    dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(Path(folder) / STATE)))


def load(path: Path, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Fill this run's trained tensors and AdamW's state (whole or sharded) from checkpoint `path`."""
    import torch.distributed.checkpoint as dcp

    meta = read_metadata(path)
    init_optimizer_state(optimizer)
    sd = _state_dict(params, optimizer)
    saved = {k.split(".", 1)[1]: m for k, m in meta.state_dict_metadata.items() if k.startswith("trainable.")}
    if set(saved) != set(params):
        diff = sorted(set(saved) ^ set(params))[:3]
        raise LoraForgeError(f"{path}: the checkpoint's trained tensors differ from this run's ({', '.join(diff)} "
                             "...); resume with the same method, model, rank and targets")
    for name, p in params.items():
        if list(saved[name].size) != list(p.shape):
            raise LoraForgeError(f"{path}: {name} has shape {list(saved[name].size)} in the checkpoint, "
                                 f"{list(p.shape)} in this run; resume with the same rank")
    with torch.no_grad():
        dcp.load(sd, storage_reader=SafeReader(str(Path(path) / STATE)))


def verify(path: Path) -> None:
    """Raise LoraForgeError unless the index reads and every byte range it names is on disk."""
    meta = read_metadata(path)
    folder = Path(path) / STATE
    ends: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in ends.items():
        f = folder / rel
        if not f.is_file() or f.stat().st_size < end:
            raise LoraForgeError(f"{f}: missing or cut short; delete the checkpoint to resume from an earlier one")


def read_metadata(path: Path):
    file = Path(path) / STATE / ".metadata"
    try:
        return _MetadataUnpickler(io.BytesIO(file.read_bytes())).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise LoraForgeError(f"{file}: unreadable checkpoint index ({e}); delete the checkpoint to resume from "
                             "an earlier one") from None


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata records and nothing else (no functions, no arbitrary classes)."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint.planner")

    def find_class(self, module: str, name: str):
        import collections
        import importlib

        if module in self._MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.memory_format, torch.layout)):
                return obj
        elif (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            import pathlib  # the checkpoint's own folder, recorded in the index

            return getattr(pathlib, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):  # "torch.strided" -> torch.strided
            from torch.serialization import _get_layout

            return _get_layout
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint index")


def _safe_reader():
    import torch.distributed.checkpoint as dcp

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            meta = read_metadata(Path(self.path).parent)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(meta, "storage_meta", None) is None:
                meta.storage_meta = StorageMeta()
            meta.storage_meta.load_id = self.load_id
            return meta

    return Reader


def SafeReader(path: str):  # noqa: N802 - stands in for a class (built lazily: DCP imports are slow)
    return _safe_reader()(path)
