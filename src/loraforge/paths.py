"""Where loraforge keeps its cache, and atomic file writes."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import LoraForgeError


def home() -> Path:
    return Path(os.environ.get("LORAFORGE_HOME") or Path.home() / ".cache" / "loraforge").expanduser()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one rename.

    A crash leaves either the old folder or the new one, never half of either.
    """
    dest = Path(dest)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    except OSError as e:
        _raise_if_disk_full(e, dest)
        raise
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        old = None
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old{os.getpid()}")
            os.rename(dest, old)
        os.rename(tmp, dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_if_disk_full(e, dest)
        raise


# The names atomic_dir gives its work folders beside `dest`: mkdtemp's 8 random characters, or ".old<pid>".
def _temp_names(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(?:[a-z0-9_]{{8}}|old\d+)")


def remove_stale_temp(dest: str | os.PathLike) -> list[Path]:
    """Delete the work folders and files that an atomic write of `dest` killed midway left beside it.

    Only names of exactly the form atomic_dir / atomic_write_* / save_safetensors create for `dest` are
    touched (".NAME." + 8 random characters, or ".NAME.old<pid>"); returns what was removed.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern, removed = _temp_names(dest.name), []
    for p in dest.parent.iterdir():
        if pattern.fullmatch(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed


class DiskFullError(LoraForgeError):
    """The device filled up during an atomic write of `path`; nothing at the destination was replaced."""

    def __init__(self, message: str, path: Path):
        super().__init__(message)
        self.path = path


def is_disk_full(e: BaseException) -> bool:
    if isinstance(e, DiskFullError):
        return True
    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    # safetensors' Rust writer raises SafetensorError with the OS message in its text
    return type(e).__name__ == "SafetensorError" and "No space left" in str(e)


def _raise_if_disk_full(e: BaseException, dest: Path) -> None:
    if is_disk_full(e):
        raise DiskFullError(f"{dest}: no space left on the device while writing it; nothing there was replaced "
                            "and the files written before are intact; free some space and run again", dest) from None


def _input_under(real: Path, inputs: Iterable[str | os.PathLike]):
    """The first of `inputs` that is `real` (a resolved output path) or lies inside it, else None."""
    for src in inputs:
        s = Path(os.path.realpath(src))
        if real == s or real in s.parents:
            return src
    return None


def check_output_dir(out: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                     flag: str = "--out", marker: str = "config.json") -> Path:
    """Refuse an output folder whose replacement could destroy the user's files, before any work starts.

    Refused: a folder that is or holds one of `inputs` (even with `overwrite`); a file; a non-empty folder
    without `overwrite`; and, with `overwrite`, anything but a model folder a command of ours writes (plain
    files beside a config.json, or beside `marker`), or a folder that holds the working or home directory.
    """
    out = Path(out)
    real = Path(os.path.realpath(out))
    src = _input_under(real, inputs)
    if src is not None:
        raise LoraForgeError(f"{flag} {out}: holds the input {src}, which writing there would delete; "
                             "choose another folder")
    if not out.exists() and not out.is_symlink():
        return out
    if not out.is_dir():
        raise LoraForgeError(f"{flag} {out}: exists and is not a folder; choose another {flag}")
    entries = list(out.iterdir())
    if not entries:
        return out
    if not overwrite:
        raise LoraForgeError(f"{flag} {out}: already exists and is not empty; pass --overwrite to replace it, "
                             f"or choose another {flag}")
    if out.is_symlink():  # replacing it would swap the link for a folder and strand the link's target
        raise LoraForgeError(f"{flag} {out}: is a symbolic link; --overwrite only replaces a real model folder")
    for keep in (Path.cwd(), Path.home()):
        if real == Path(os.path.realpath(keep)) or real in Path(os.path.realpath(keep)).parents:
            raise LoraForgeError(f"{flag} {out}: holds {keep}; --overwrite only replaces a model folder")
    if not (out / marker).is_file() or any(p.is_dir() or p.is_symlink() for p in entries):
        raise LoraForgeError(f"{flag} {out}: is not a model folder ({marker} and files only), so --overwrite "
                             f"will not replace it; choose another {flag}")
    return out


def _umask() -> int:
    """The process umask (read by setting it and putting it back). mkstemp/mkdtemp create 0600/0700
    entries; outputs get the mode a plain open()/mkdir() would give them instead."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temp file in path's folder (created if needed), named so a rename onto path is atomic."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        _raise_if_disk_full(e, path)
        raise


def check_output_file(out: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                      flag: str = "--out") -> Path:
    """Refuse an output file that is one of `inputs`, a folder, or (without `overwrite`) an existing file."""
    out = Path(out)
    src = _input_under(Path(os.path.realpath(out)), inputs)
    if src is not None:
        raise LoraForgeError(f"{flag} {out}: is the input {src}, which writing there would destroy; "
                             f"choose another {flag}")
    if out.is_dir():
        raise LoraForgeError(f"{flag} {out}: is a folder; pass a file name")
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise LoraForgeError(f"{flag} {out}: already exists; pass --overwrite to replace it, or choose another {flag}")
    return out


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file name beside `path` for a writer that opens files by name (gguf's GGUFWriter);
    on success it replaces `path` in one rename, on failure it is removed."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        _raise_if_disk_full(e, path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """safetensors.save_file, written to a temp file and renamed (with the mode the JSON beside it gets:
    save_file itself creates files 0600)."""
    from safetensors.torch import save_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
