"""Rows from what the `datasets` library reads locally: a folder written by `save_to_disk` (a Dataset, or
a DatasetDict's train split), a folder of data files as `load_dataset(folder)` finds them (a hub dataset's
repository cloned to disk: data/train-00000-of-00002.parquet, ...), and .arrow files.

Rows come out as `files.Row`s, so `records.py` applies the same format rules and names the same
places. The files of a data-file folder are read by `files.py` itself, keeping its line numbers and its
stricter CSV rule (datasets' CSV reader, pandas, silently shifts a row's cells when an unquoted comma
adds one); saved datasets and .arrow files are named "path:row N" (rows counted from 1, as for Parquet).
Rows are streamed (`streaming=True`, or row by row from the memory-mapped Arrow files of a saved
dataset), and nothing is fetched from a hub: a name that is not a local path is refused before
`datasets` sees it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import LoraForgeError
from .files import Row

SPLIT = "train"
HUB_HINT = ("training data is read from local files and folders only, never fetched from a hub (save a hub "
            "dataset locally first, e.g. datasets.load_dataset(NAME).save_to_disk(DIR))")


def reads(path: Path) -> bool:
    """Whether `path` is for this module rather than files.py: a folder, or an Arrow file."""
    return path.suffix.lower() == ".arrow" or path.is_dir()


def dataset_rows(path: Path, read_file) -> Iterator[Row]:
    """The rows of a saved dataset, a data-file folder or an .arrow file. `read_file(path)` reads the file
    types files.py knows (passed in, since files.py calls this module)."""
    datasets = _import(path)
    if not path.is_dir():
        yield from _arrow_rows(datasets, path)
    elif (path / "dataset_dict.json").is_file():
        split = _pick_split(path, _saved_splits(path))
        yield from _table_rows(datasets, path / split, f"{path / split}")
    elif (path / "state.json").is_file() and (path / "dataset_info.json").is_file():
        yield from _table_rows(datasets, path, str(path))
    else:
        for f in _folder_files(datasets, path):
            yield from read_file(f)


def _import(path: Path):
    # Offline before the import: datasets reads these once, when it is first imported.
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import datasets
    except ImportError:
        raise LoraForgeError(f"{path}: reading a dataset folder or an .arrow file needs the datasets library; "
                             "pip install 'loraforge[datasets]'") from None

    datasets.config.HF_HUB_OFFLINE = True  # imported earlier by someone else: the config is already read
    datasets.utils.logging.disable_progress_bar()
    return datasets


def _saved_splits(path: Path) -> list[str]:
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LoraForgeError(f"{path / 'dataset_dict.json'}: not a readable dataset_dict.json ({e})") from None
    if not isinstance(splits, list) or not all(isinstance(s, str) for s in splits):
        raise LoraForgeError(f"{path / 'dataset_dict.json'}: 'splits' must be a list of split names")
    return splits


def _pick_split(path: Path, splits: list[str]) -> str:
    if SPLIT in splits:
        return SPLIT
    # One split under another name (all of "validation", say) is as ambiguous as several: name them all.
    raise LoraForgeError(f"{path}: a dataset with splits {', '.join(splits) or '(none)'} and no {SPLIT!r} split; "
                         "pass one split's folder (or save the training rows as the 'train' split)")


def _table_rows(datasets, folder: Path, where: str) -> Iterator[Row]:
    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:  # noqa: BLE001 -- datasets raises many types for a damaged folder
        raise LoraForgeError(f"{folder}: not a readable saved dataset ({type(e).__name__}: {e})") from None
    if not isinstance(ds, datasets.Dataset):
        raise LoraForgeError(f"{folder}: expected one saved dataset, found a {type(ds).__name__}")
    # to_iterable_dataset reads the memory-mapped Arrow files shard by shard, row by row.
    for n, row in enumerate(ds.to_iterable_dataset(), 1):
        yield Row(f"{where}:row {n}", row)


def _folder_files(datasets, path: Path) -> list[Path]:
    """The train split's data files as load_dataset(folder) would find them (by name patterns such as
    train-*.parquet or data/train/*, else every data file)."""
    try:
        builder = datasets.load_dataset_builder(str(path))
        files = builder.config.data_files or {}
    except Exception as e:  # noqa: BLE001 -- no data files, mixed types, a damaged README: all one answer here
        raise LoraForgeError(f"{path}: not a dataset folder datasets can read ({type(e).__name__}: "
                             f"{_first_line(e)})") from None
    split = _pick_split(path, [str(s) for s in files])
    chosen = [Path(str(f)) for f in files[split]]
    # files.py (or _arrow_rows) reads each one, and refuses a type it does not know (pandas' pickles, say).
    return chosen


def _arrow_rows(datasets, path: Path) -> Iterator[Row]:
    if not path.is_file():
        raise LoraForgeError(f"{path}: no such file")
    try:
        ds = datasets.load_dataset("arrow", data_files=str(path), split=SPLIT, streaming=True)
        for n, row in enumerate(ds, 1):
            yield Row(f"{path}:row {n}", row)
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a damaged file
        raise LoraForgeError(f"{path}: not a readable Arrow file ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e) else ""
