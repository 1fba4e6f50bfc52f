"""Training records: what users bring (chat, alpaca, prompt/completion, plain text), checked and normalised.

Every file is read into the same `Record` type, so nothing downstream cares which format or file type a
record came from. Alpaca records become two-turn chats (instruction + input as the user turn, output as
the assistant turn): they are rendered by the model's chat template exactly as chat data is, which is how
the model will be prompted at inference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LoraForgeError
from .files import MAX_LINE_BYTES, read_rows

log = logging.getLogger("loraforge")

ROLES = ("system", "user", "assistant")
FORMATS = ("chat", "alpaca", "completion", "text")
# The fields that identify each format, tried in this order on the first usable record of a file.
SIGNATURES = {"chat": ("messages",), "alpaca": ("instruction", "output"), "completion": ("prompt", "completion"),
              "text": ("text",)}
EXPECTED = "messages (chat), instruction + output (alpaca), prompt + completion, or text"


@dataclass(frozen=True)
class Record:
    kind: str  # "chat" (chat and alpaca files), "completion" or "text"
    where: str  # "path:line" the record came from, for error messages
    messages: tuple[tuple[str, str], ...] | None = None  # (role, content) pairs, for kind "chat"
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None

    def chat(self) -> list[dict[str, str]]:
        """The messages as the list of {role, content} dicts chat templates take."""
        return [{"role": r, "content": c} for r, c in self.messages or ()]


class _Bad(Exception):
    """One record is unusable; the message says why (without the location, which the reader adds)."""


def read_records(path: str | Path, fmt: str | None = None, skip_bad_lines: bool = False, *, txt_lines: bool = False,
                 max_line_bytes: int = MAX_LINE_BYTES) -> list[Record]:
    """Read a .jsonl, .json (array or lines), .csv, .parquet or .txt file of training records.

    A .txt file is plain text records: one per blank-line-separated paragraph, or per line with
    `txt_lines`. A line (record) over `max_line_bytes` is a bad record.

    The format is detected from the fields of the file's first record unless `fmt` (chat, alpaca,
    completion, text) names it. A bad record raises LoraForgeError naming its file:line, or with
    `skip_bad_lines` is skipped and counted in one warning; a file with no usable record always raises.
    """
    if fmt is not None and fmt not in FORMATS:
        raise LoraForgeError(f"data format {fmt!r}: choose one of {', '.join(FORMATS)}")
    records: list[Record] = []
    bad: list[str] = []
    rows = 0
    for row in read_rows(path, txt_lines=txt_lines, max_line_bytes=max_line_bytes):
        rows += 1
        try:
            if row.error is not None:
                raise _Bad(row.error)
            if not isinstance(row.value, dict):
                raise _Bad(f"expected an object with fields {EXPECTED}, got {_type(row.value)}")
            fmt = fmt or _detect(row.value)
            records.append(_PARSERS[fmt](row.value, row.where))
        except _Bad as e:
            if not skip_bad_lines:
                raise LoraForgeError(f"{row.where}: {e}") from None
            bad.append(f"{row.where}: {e}")
    if rows == 0:
        raise LoraForgeError(f"{path}: empty file; expected records with fields {EXPECTED}")
    if bad:
        log.warning("%s: skipped %d bad record%s (first: %s)", path, len(bad), "s" * (len(bad) > 1), bad[0])
    if not records:
        raise LoraForgeError(f"{path}: no usable records ({len(bad)} bad ones skipped; first: {bad[0]})")
    return records


def _detect(row: dict[str, Any]) -> str:
    for fmt, fields in SIGNATURES.items():
        if all(row.get(f) is not None for f in fields):
            return fmt
    # Some of a format's fields: that format, so the error names the field that is missing.
    for fmt, fields in SIGNATURES.items():
        if any(row.get(f) is not None for f in fields):
            return fmt
    raise _Bad(f"cannot tell the format from fields {sorted(row)}; expected {EXPECTED} (or pass the format explicitly)")


def _type(v: Any) -> str:
    # JSON's names, since that is what users wrote
    if v is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array",
            dict: "an object"}.get(type(v), type(v).__name__)


def _string(row: dict[str, Any], field: str, fmt: str, optional: bool = False) -> str:
    v = row.get(field)
    if v is None:
        if optional:
            return ""
        raise _Bad(f"missing field {field!r} ({fmt} records need {' + '.join(SIGNATURES[fmt])})")
    if not isinstance(v, str):
        raise _Bad(f"field {field!r} must be a string, got {_type(v)}")
    return v


def _chat(row: dict[str, Any], where: str) -> Record:
    msgs = row.get("messages")
    if msgs is None:
        raise _Bad("missing field 'messages' (a chat record needs a list of {role, content} objects)")
    if isinstance(msgs, str):  # CSV cells (and string Parquet columns) hold the list as JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError as e:
            raise _Bad(f"field 'messages' is not valid JSON ({e.msg})") from None
        except RecursionError:
            raise _Bad("field 'messages' is nested too deeply to parse") from None
    if not isinstance(msgs, list) or not msgs:
        raise _Bad(f"field 'messages' must be a non-empty list of {{role, content}} objects, got {_type(msgs)}")
    pairs = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise _Bad(f"messages[{j}] must be an object with role and content, got {_type(m)}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            got = "missing" if role is None else repr(role)
            raise _Bad(f"messages[{j}].role is {got}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise _Bad(f"messages[{j}].content must be a string, got {_type(content)}")
        pairs.append((role, content))
    if not any(r == "assistant" for r, _ in pairs):
        raise _Bad("messages has no assistant turn, so there is nothing to train on")
    return Record("chat", where, messages=tuple(pairs))


def _alpaca(row: dict[str, Any], where: str) -> Record:
    instruction = _string(row, "instruction", "alpaca")
    output = _string(row, "output", "alpaca")
    extra = _string(row, "input", "alpaca", optional=True)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return Record("chat", where, messages=(("user", user), ("assistant", output)))


def _completion(row: dict[str, Any], where: str) -> Record:
    return Record("completion", where, prompt=_string(row, "prompt", "completion"),
                  completion=_string(row, "completion", "completion"))


def _text(row: dict[str, Any], where: str) -> Record:
    text = _string(row, "text", "text")
    if not text.strip():
        raise _Bad("field 'text' is empty")
    return Record("text", where, text=text)


_PARSERS = {"chat": _chat, "alpaca": _alpaca, "completion": _completion, "text": _text}


def split_records(records: list[Record], val_split: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Hold out round(val_split * n) records (at least one when val_split > 0) chosen by `seed`.

    Both parts keep the file order; the same records, fraction and seed always give the same split.
    """
    if not 0 <= val_split < 1:
        raise LoraForgeError(f"val_split {val_split}: expected a fraction in [0, 1)")
    n = len(records)
    n_val = max(1, round(n * val_split)) if val_split > 0 else 0
    if n_val >= n and n_val > 0:
        raise LoraForgeError(f"val_split {val_split} of {n} records leaves nothing to train on")
    held = set(np.random.default_rng(seed).permutation(n)[:n_val].tolist())
    return [r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held]


def prompt_and_reference(record: Record) -> tuple[list[dict[str, str]] | str, str | None]:
    """What to give the model, and the string it should produce (for exact-match evaluation).

    Chat: every message before the last assistant turn, and that turn's content. Completion: the prompt
    and the completion. Text has nothing to compare against: (text, None).
    """
    if record.kind == "chat":
        msgs = record.chat()
        last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
        return msgs[:last], msgs[last]["content"]
    if record.kind == "completion":
        return record.prompt, record.completion
    return record.text, None
