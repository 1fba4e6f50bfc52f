"""Reading records: every format from every file type, detection, bad data, splits, eval prompts."""

from __future__ import annotations

import csv
import io
import json
import logging
import sys

import pytest

from loraforge.data import Record, prompt_and_reference, read_records, split_records
from loraforge.errors import LoraForgeError

ROWS = {
    "chat": [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi, there"},
                      {"role": "assistant", "content": 'Hello,\n"friend"'}]},
        {"messages": [{"role": "user", "content": "1+1?\u2028"}, {"role": "assistant", "content": "2\r\n"},
                      {"role": "user", "content": "and 2+2?"}, {"role": "assistant", "content": "4"}]},
    ],
    "alpaca": [
        {"instruction": "Add the numbers.", "input": "2, 2", "output": "4"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"},
    ],
    "completion": [{"prompt": "Q: 1+1?\nA:", "completion": " 2"}, {"prompt": "Capital of France:", "completion": " Paris"}],
    "text": [{"text": "plain, text\nwith a newline"}, {"text": "another document"}],
}


def expected(fmt: str, row: dict) -> dict:
    """The Record fields each format's row should become (where aside)."""
    if fmt == "chat":
        return {"kind": "chat", "messages": tuple((m["role"], m["content"]) for m in row["messages"])}
    if fmt == "alpaca":
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return {"kind": "chat", "messages": (("user", user), ("assistant", row["output"]))}
    if fmt == "completion":
        return {"kind": "completion", "prompt": row["prompt"], "completion": row["completion"]}
    return {"kind": "text", "text": row["text"]}


def write(path, rows: list) -> list[str]:
    """Write rows in the file type `path`'s extension names; return each row's expected `where`."""
    ext = path.suffix
    if ext in (".jsonl", ".json") and path.stem.endswith("lines"):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return [f"{path}:{i + 1}" for i in range(len(rows))]
    if ext == ".jsonl":  # with a blank line first: blank lines are skipped but still counted
        path.write_text("\n" + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        return [f"{path}:{i + 2}" for i in range(len(rows))]
    if ext == ".json":
        path.write_text("[\n" + ",\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n]\n")
        return [f"{path}:{i + 2}" for i in range(len(rows))]
    if ext == ".csv":
        fields = list(dict.fromkeys(k for r in rows for k in r))
        out, where, line = io.StringIO(), [], 2
        w = csv.DictWriter(out, fields, lineterminator="\n")
        w.writeheader()
        for r in rows:
            cell = {k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()}
            before = out.tell()
            w.writerow(cell)
            where.append(f"{path}:{line}")
            line += out.getvalue()[before:].count("\n")  # quoted cells may hold newlines
        path.write_text(out.getvalue())
        return where
    if ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), str(path))
        return [f"{path}:row {i + 1}" for i in range(len(rows))]
    raise AssertionError(ext)


@pytest.mark.parametrize("ext", [".jsonl", ".json", ".csv", ".parquet", "_lines.json"])
@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_from_every_file_type(tmp_path, fmt, ext):
    path = tmp_path / f"data{ext}"
    where = write(path, ROWS[fmt])
    records = read_records(path)
    assert len(records) == len(ROWS[fmt])
    for rec, row, w in zip(records, ROWS[fmt], where, strict=True):
        want = Record(where=w, **expected(fmt, row))
        assert rec == want


def test_csv_line_numbers_survive_multiline_cells(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('prompt,completion\n"a\nb\nc",x\n\nd,7\ne\n')
    # lines: 1 header, 2-4 one quoted row, 5 blank, 6 a row, 7 a short row
    with pytest.raises(LoraForgeError, match=rf"^{path}:7: missing field 'completion'"):
        read_records(path)
    recs = read_records(path, skip_bad_lines=True)
    assert [(r.where, r.prompt) for r in recs] == [(f"{path}:2", "a\nb\nc"), (f"{path}:6", "d")]


def test_detection_prefers_the_richer_format_and_fmt_overrides(tmp_path):
    path = tmp_path / "d.jsonl"
    write(path, [{"prompt": "p", "completion": "c", "text": "t"}])
    assert read_records(path)[0].kind == "completion"
    assert read_records(path, fmt="text")[0] == Record("text", f"{path}:2", text="t")
    # Detection is per file: a text file read as alpaca fails on the alpaca fields
    text_file = tmp_path / "t.jsonl"
    write(text_file, [{"text": "t"}])
    with pytest.raises(LoraForgeError, match=rf"^{text_file}:2: missing field 'instruction'"):
        read_records(text_file, fmt="alpaca")
    with pytest.raises(LoraForgeError, match="data format 'sharegpt'"):
        read_records(text_file, fmt="sharegpt")


def test_per_file_detection(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.csv"
    write(a, ROWS["alpaca"])
    write(b, ROWS["text"])
    assert {r.kind for r in read_records(a)} == {"chat"}
    assert {r.kind for r in read_records(b)} == {"text"}


MSG_OK = {"role": "user", "content": "q"}
ASSISTANT = {"role": "assistant", "content": "a"}

BAD = [
    ("d.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": "ok",\n', r"d.jsonl:3: not valid JSON"),
    ("d.jsonl", '{"instruction": "i", "output": "o"}\n{"instruction": "i"}\n', r"d.jsonl:2: missing field 'output'"),
    ("d.jsonl", '{"output": "o"}\n', r"d.jsonl:1: missing field 'instruction' \(alpaca records need instruction \+ output\)"),
    ("d.jsonl", json.dumps({"messages": [MSG_OK, {"role": "bot", "content": "a"}]}) + "\n",
     r"d.jsonl:1: messages\[1\]\.role is 'bot'; expected one of system, user, assistant"),
    ("d.jsonl", json.dumps({"messages": [MSG_OK, {"content": "a"}]}) + "\n", r"d.jsonl:1: messages\[1\]\.role is missing"),
    ("d.jsonl", json.dumps({"messages": [MSG_OK, {"role": "assistant", "content": 3}]}) + "\n",
     r"d.jsonl:1: messages\[1\]\.content must be a string, got a number"),
    ("d.jsonl", json.dumps({"messages": [MSG_OK]}) + "\n", r"d.jsonl:1: messages has no assistant turn"),
    ("d.jsonl", json.dumps({"messages": []}) + "\n", r"d.jsonl:1: field 'messages' must be a non-empty list"),
    ("d.jsonl", json.dumps({"messages": "hi"}) + "\n", r"d.jsonl:1: field 'messages' is not valid JSON"),
    ("d.jsonl", '{"prompt": "p", "completion": "c"}\n{"prompt": "p", "completion": 5}\n',
     r"d.jsonl:2: field 'completion' must be a string, got a number"),
    ("d.jsonl", '{"text": ["a"]}\n', r"d.jsonl:1: field 'text' must be a string, got an array"),
    ("d.jsonl", '{"text": "  "}\n', r"d.jsonl:1: field 'text' is empty"),
    ("d.jsonl", '{"question": "q", "answer": "a"}\n', r"d.jsonl:1: cannot tell the format from fields \['answer', 'question'\]"),
    ("d.jsonl", '["text", "a"]\n', r"d.jsonl:1: expected an object with fields"),
    ("d.jsonl", "", r"d.jsonl: empty file"),
    ("d.jsonl", "\n  \n", r"d.jsonl: empty file"),
    ("d.json", "[]", r"d.json: empty file"),
    ("d.csv", "text\n", r"d.csv: empty file"),
    ("d.json", '[\n{"text": "a"},\n\n  {"text": 1}\n]', r"d.json:4: field 'text' must be a string, got a number"),
    ("d.json", '[\n{"text": "a"},\n{"text": "b" x}\n]', r"d.json:3: not valid JSON"),
    ("d.json", '[\n{"text": "a"}\n{"text": "b"}\n]', r"d.json:3: not valid JSON \(expected ','"),
    ("d.csv", 'instruction,input,output\n"i",,"o"\n"i2",""\n', r"d.csv:3: missing field 'output'"),
    ("d.csv", 'messages\n"[{""role"": ""user"", ""content"": ""q""}, {""role"": ""assistant""}]"\n',
     r"d.csv:2: messages\[1\]\.content must be a string, got null"),
    ("d.xlsx", "hello", r"d.xlsx: unknown data file type '.xlsx'; use .jsonl, .json, .csv, .parquet, or .txt"),
    ("d.parquet", "not parquet", r"d.parquet: not a readable Parquet file"),
]


@pytest.mark.parametrize("name,content,message", BAD, ids=[m.split(": ", 1)[1][:40] for _, _, m in BAD])
def test_bad_data_names_file_and_line(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(LoraForgeError, match="^" + str(tmp_path).replace("\\", "\\\\") + "/" + message):
        read_records(path)


def test_bad_parquet_row(tmp_path):
    path = tmp_path / "d.parquet"
    write(path, [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}])
    with pytest.raises(LoraForgeError, match=rf"^{path}:row 2: missing field 'completion'"):
        read_records(path)


def test_missing_file(tmp_path):
    with pytest.raises(LoraForgeError, match="no such file"):
        read_records(tmp_path / "nope.jsonl")


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"")
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # makes `import pyarrow.parquet` fail
    with pytest.raises(LoraForgeError, match=rf"^{path}: reading Parquet needs pyarrow"):
        read_records(path)


def test_skip_bad_lines_counts_and_keeps_the_good(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": 1}\nnot json\n{"text": "b"}\n{"txt": "c"}\n')
    with caplog.at_level(logging.WARNING, logger="loraforge"):
        recs = read_records(path, skip_bad_lines=True)
    assert [(r.text, r.where) for r in recs] == [("a", f"{path}:1"), ("b", f"{path}:4")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert f"skipped 3 bad records (first: {path}:2: field 'text' must be a string" in warnings[0]


def test_skip_bad_lines_detects_from_first_usable_record(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"x": 1}\n{"prompt": "p", "completion": "c"}\n')
    recs = read_records(path, skip_bad_lines=True)
    assert [r.kind for r in recs] == ["completion"]


def test_skip_bad_lines_still_fails_when_nothing_is_left(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 1}\n{"text": 2}\n')
    with pytest.raises(LoraForgeError, match=rf"^{path}: no usable records \(2 bad ones skipped; first: {path}:1"):
        read_records(path, skip_bad_lines=True)


def _records(n: int) -> list[Record]:
    return [Record("text", f"f:{i}", text=str(i)) for i in range(n)]


@pytest.mark.parametrize("n,frac", [(100, 0.1), (7, 0.3), (5, 0.01), (10, 0.0)])
def test_split_is_a_deterministic_partition(n, frac):
    records = _records(n)
    train, val = split_records(records, frac, seed=3)
    assert (train, val) == split_records(records, frac, seed=3)
    assert len(val) == (max(1, round(n * frac)) if frac else 0)
    assert sorted(train + val, key=lambda r: int(r.text)) == records
    for part in (train, val):  # file order kept within each part
        assert part == sorted(part, key=lambda r: int(r.text))


def test_split_depends_on_seed():
    records = _records(100)
    assert split_records(records, 0.2, seed=0)[1] != split_records(records, 0.2, seed=1)[1]


@pytest.mark.parametrize("frac", [-0.1, 1.0, 0.8])
def test_split_rejects_bad_fractions(frac):
    with pytest.raises(LoraForgeError, match="val_split"):
        split_records(_records(2), frac)


def test_val_file_is_just_another_read(tmp_path):
    path = tmp_path / "val.jsonl"
    write(path, ROWS["completion"])
    assert [r.prompt for r in read_records(path)] == [r["prompt"] for r in ROWS["completion"]]


def test_prompt_and_reference(tmp_path):
    chat = tmp_path / "c.jsonl"
    write(chat, ROWS["chat"])
    prompt, ref = prompt_and_reference(read_records(chat)[1])
    assert prompt == ROWS["chat"][1]["messages"][:3]
    assert ref == "4"
    alpaca = tmp_path / "a.jsonl"
    write(alpaca, ROWS["alpaca"])
    prompt, ref = prompt_and_reference(read_records(alpaca)[0])
    assert prompt == [{"role": "user", "content": "Add the numbers.\n\n2, 2"}] and ref == "4"
    assert prompt_and_reference(Record("completion", "f:1", prompt="p", completion="c")) == ("p", "c")
    assert prompt_and_reference(Record("text", "f:1", text="t")) == ("t", None)
