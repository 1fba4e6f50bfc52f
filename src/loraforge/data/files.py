"""Read the raw rows of a data file, each with the place it came from: JSONL, JSON arrays, CSV and TSV,
Parquet, and plain text (one {"text": ...} row per paragraph, or per line); the text types also gzip-,
bzip2- or xz-compressed. Folders and .arrow files are read through the datasets library (hf_datasets.py).

This layer knows file syntax only; what a row must contain is `records.py`'s business. A row that is
not even parseable (a malformed JSON line) comes back with `error` set rather than raising, so the
caller can skip it under `skip_bad_lines`. Damage that ends the file's readability (a broken JSON
array, a broken CSV quote) raises at once: there is no next row to skip to.

A row longer than `max_line_bytes` is such a bad row, reported before it is parsed: one 50 MB line
would otherwise cost a minute and gigabytes only to be cut to max_len tokens.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraForgeError

EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
# A compressed text file is read as the file inside it: data.jsonl.gz is JSON lines.
COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
TAB = "\t"
MAX_LINE_BYTES = 4 * 2**20  # TrainConfig.max_line_bytes, --max-line-bytes


@dataclass
class Row:
    where: str  # "path:line" (Parquet: "path:row N", rows counted from 1)
    value: Any = None  # the parsed row; a dict for well-formed files
    error: str | None = None  # why the row could not be parsed, else None


def read_rows(path: str | Path, *, txt_lines: bool = False, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Row]:
    """The rows of a data file. A .txt file gives one {"text": ...} row per blank-line-separated paragraph,
    or per non-blank line with `txt_lines`. A file compressed with gzip, bzip2 or xz (data.jsonl.gz) is read
    as the file inside; folders and .arrow files go to the datasets library (hf_datasets.py)."""
    from . import hf_datasets

    p = Path(path)
    if hf_datasets.reads(p):
        yield from hf_datasets.dataset_rows(p, lambda f: read_rows(f, txt_lines=txt_lines,
                                                                    max_line_bytes=max_line_bytes))
        return
    compression = COMPRESSIONS.get(p.suffix.lower())
    ext = Path(p.stem).suffix.lower() if compression else p.suffix.lower()
    if ext not in EXTENSIONS and not p.exists():
        raise LoraForgeError(f"{path}: no such file or folder; {hf_datasets.HUB_HINT}")
    if ext not in EXTENSIONS or (compression and ext == ".parquet"):
        raise LoraForgeError(f"{path}: unknown data file type {p.suffix.lower() or '(no extension)'!r}; use .jsonl, "
                             ".json, .csv, .parquet, or .txt for plain text (also .tsv, .arrow, a .gz, .bz2 or .xz "
                             "of a text file, or a folder the datasets library reads)")
    if not p.is_file():
        raise LoraForgeError(f"{path}: no such file")
    if ext == ".parquet":
        yield from _parquet_rows(path)
        return
    try:
        with (compression or open)(p, "rb") as f:
            text = f.read().decode("utf-8-sig")  # -sig: editors on Windows prepend a byte-order mark
    except UnicodeDecodeError as e:
        raise LoraForgeError(f"{path}: not UTF-8 text (byte {e.start}); re-save the file as UTF-8") from None
    except OSError as e:
        raise LoraForgeError(f"{path}: cannot read ({e.strerror or e})") from None
    except (EOFError, lzma.LZMAError) as e:  # gzip's BadGzipFile is an OSError
        raise LoraForgeError(f"{path}: not a readable compressed file ({e})") from None
    if ext in (".csv", ".tsv"):
        yield from _csv_rows(path, text, max_line_bytes, TAB if ext == ".tsv" else ",")
    elif ext == ".txt":
        yield from _text_rows(path, text, txt_lines, max_line_bytes)
    elif ext == ".json" and text.lstrip().startswith("["):
        yield from _json_array_rows(path, text, max_line_bytes)
    else:
        # A .json file that is not an array is read as JSON lines: `datasets.Dataset.to_json` writes those.
        yield from _jsonl_rows(path, text, max_line_bytes)


def _too_long(text: str, limit: int) -> str | None:
    """Why `text` is over `limit` UTF-8 bytes (None if it is not). A character is 1 to 4 bytes, so most
    texts are settled by their length alone."""
    if len(text) <= limit // 4:
        return None
    n = len(text.encode("utf-8", "surrogatepass"))
    if n <= limit:
        return None
    return f"{n:,} bytes long, over the limit of {limit:,} (raise it with --max-line-bytes, or split the record)"


NESTED = "nested too deeply to parse (is it a JSON object of records?)"


def _jsonl_rows(path, text: str, max_line_bytes: int) -> Iterator[Row]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other characters splitlines breaks at
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        long = _too_long(line, max_line_bytes)
        if long:
            yield Row(f"{path}:{n}", error=f"the line is {long}")
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            yield Row(f"{path}:{n}", error=f"not valid JSON ({e.msg} at column {e.colno}); expected one JSON object per line")
            continue
        except RecursionError:
            yield Row(f"{path}:{n}", error=f"the line is {NESTED}")
            continue
        yield Row(f"{path}:{n}", value)


def _text_rows(path, text: str, per_line: bool, max_line_bytes: int) -> Iterator[Row]:
    """Paragraphs (runs of non-blank lines) or single lines, each with the line it starts on."""
    para: list[str] = []
    start = 0
    lines = text.split("\n")
    for n, line in enumerate([*lines, ""], 1):  # a blank line at the end closes the last paragraph
        if line.strip() and not per_line:
            if not para:
                start = n
            para.append(line)
            continue
        chunk, at = ("\n".join(para), start) if not per_line else (line, n)
        para = []
        if not chunk.strip():
            continue
        long = _too_long(chunk, max_line_bytes)
        yield Row(f"{path}:{at}", error=f"the {'line' if per_line else 'paragraph'} is {long}") if long \
            else Row(f"{path}:{at}", {"text": chunk})


def _json_array_rows(path, text: str, max_line_bytes: int) -> Iterator[Row]:
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
            begin = i
            value, i = dec.raw_decode(text, i)
        except json.JSONDecodeError as e:
            raise LoraForgeError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:  # no way to find where this element ends, so no next record to go on with
            raise LoraForgeError(f"{path}:{line}: the array element is {NESTED}") from None
        long = _too_long(text[begin:i], max_line_bytes)
        yield Row(f"{path}:{line}", error=f"the record is {long}") if long else Row(f"{path}:{line}", value)
        i = skip_ws(i)
        if i < len(text) and text[i] == ",":
            i = skip_ws(i + 1)
            continue
        if i < len(text) and text[i] == "]":
            return
        at = text.count("\n", 0, i) + 1
        raise LoraForgeError(f"{path}:{at}: not valid JSON (expected ',' or ']' between array elements)")


def _csv_rows(path, text: str, max_line_bytes: int, delimiter: str) -> Iterator[Row]:
    # newline="": quoted cells keep their line breaks
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
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
            if len(cells) > len(header):  # an unquoted comma, most likely: the cells no longer line up
                yield Row(where, error=f"{len(cells)} cells, but the header has {len(header)} (quote cells that "
                                       f"hold {'tabs' if delimiter == TAB else 'commas'})")
                continue
            long = _too_long(delimiter.join(cells), max_line_bytes)
            if long:
                yield Row(where, error=f"the row is {long}")
                continue
            # Missing trailing cells are absent, so a short row reads as "missing field" rather than as a
            # wrong type.
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
