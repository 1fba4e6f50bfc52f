"""Read the raw rows of a data file, each with the place it came from: JSONL, JSON arrays, CSV, Parquet.

This layer knows file syntax only; what a row must contain is `records.py`'s business. A row that is
not even parseable (a malformed JSON line) comes back with `error` set rather than raising, so the
caller can skip it under `skip_bad_lines`. Damage that ends the file's readability (a broken JSON
array, a broken CSV quote) raises at once: there is no next row to skip to.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraForgeError

EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")


@dataclass
class Row:
    where: str  # "path:line" (Parquet: "path:row N", rows counted from 1)
    value: Any = None  # the parsed row; a dict for well-formed files
    error: str | None = None  # why the row could not be parsed, else None


def read_rows(path: str | Path) -> Iterator[Row]:
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in EXTENSIONS:
        raise LoraForgeError(f"{path}: unknown data file type {ext or '(no extension)'!r}; use .jsonl, .json, .csv or .parquet")
    if not p.is_file():
        raise LoraForgeError(f"{path}: no such file")
    if ext == ".parquet":
        yield from _parquet_rows(path)
        return
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: editors on Windows prepend a byte-order mark
    except UnicodeDecodeError as e:
        raise LoraForgeError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise LoraForgeError(f"{path}: cannot read ({e.strerror})") from None
    if ext == ".csv":
        yield from _csv_rows(path, text)
    elif ext == ".json" and text.lstrip().startswith("["):
        yield from _json_array_rows(path, text)
    else:
        # A .json file that is not an array is read as JSON lines: `datasets.Dataset.to_json` writes those.
        yield from _jsonl_rows(path, text)


def _jsonl_rows(path, text: str) -> Iterator[Row]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(f"{path}:{n}", error=f"not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line")
            continue
        yield Row(f"{path}:{n}", value)


def _json_array_rows(path, text: str) -> Iterator[Row]:
    # Decode element by element, not with one json.loads, so each record knows the line it starts on.
    dec = json.JSONDecoder()
    i, line, counted = text.index("[") + 1, 1, 0

    def skip_ws(k: int) -> int:
        while k < len(text) and text[k] in " \t\r\n":
            k += 1
        return k

    i = skip_ws(i)
    if i < len(text) and text[i] == "]":
        return
    while True:
        line += text.count("\n", counted, i)
        counted = i
        try:
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise LoraForgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        yield Row(f"{path}:{line}", value)
        i = skip_ws(i)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        at = text.count("\n", 0, i) + 1
        raise LoraForgeError(f"{path}:{at}: not valid JSON (expected ',' or ']' between array elements)")


def _csv_rows(path, text: str) -> Iterator[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))  # newline="": quoted cells keep their line breaks
    header: list[str] | None = None
    start = 1  # a quoted cell may span lines, so each row starts on the line after the previous one ended
    try:
        for cells in reader:
            where, start = f"{path}:{start}", reader.line_num + 1
            if not cells:  # a blank line
                continue
            if header is None:
                header = cells
                continue
            # Cells past the header are dropped and missing trailing cells are absent, so a short row
            # reads as "missing field" rather than as a wrong type.
            yield Row(where, dict(zip(header, cells, strict=False)))
    except csv.Error as e:
        raise LoraForgeError(f"{path}:{reader.line_num}: malformed CSV ({e})") from None


def _parquet_rows(path) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise LoraForgeError(f"{path}: reading Parquet needs pyarrow; pip install 'loraforge[parquet]'") from None
    try:
        table = pq.read_table(str(path))
    except Exception as e:  # noqa: BLE001 -- pyarrow raises several types for a damaged file
        raise LoraForgeError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    for n, row in enumerate(table.to_pylist(), 1):
        yield Row(f"{path}:row {n}", row)
