"""Data that would crash or stall the reader: JSON nested 100,000 deep, a line of megabytes, CSV rows that do
not line up with the header; huge records tokenized only as far as max_len; and plain .txt corpora."""

from __future__ import annotations

import json
import logging

import pytest

from loraforge.data import Record, encode_records, read_records
from loraforge.errors import LoraForgeError
from loraforge.model import load_tokenizer, resolve_source

GOOD = json.dumps({"text": "a good record"})

pytestmark = pytest.mark.usefixtures("isolated_rng")  # leave the global RNGs as they were


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_source(None).folder)


def test_json_nested_100000_deep_is_a_bad_line_that_can_be_skipped(tmp_path, caplog):
    f = tmp_path / "deep.jsonl"
    f.write_text(GOOD + "\n" + "[" * 100_000 + "]" * 100_000 + "\n" + GOOD + "\n")
    with pytest.raises(LoraForgeError, match=r"deep\.jsonl:2: the line is nested too deeply"):
        read_records(f)
    with caplog.at_level(logging.WARNING, "loraforge"):
        assert len(read_records(f, skip_bad_lines=True)) == 2
    assert "deep.jsonl:2" in caplog.text
    arr = tmp_path / "deep.json"
    arr.write_text("[" + GOOD + ",\n" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(LoraForgeError, match=r"deep\.json:2: the array element is nested too deeply"):
        read_records(arr)


def test_a_line_over_the_limit_is_refused_before_it_is_parsed(tmp_path):
    f = tmp_path / "big.jsonl"
    big = json.dumps({"text": "x" * (5 * 2**20)})  # over the default 4 MiB
    f.write_text(GOOD + "\n" + big + "\n" + GOOD + "\n")
    with pytest.raises(LoraForgeError, match=r"big\.jsonl:2: the line is 5,242,892 bytes long, over the limit of "
                                             r"4,194,304 \(raise it with --max-line-bytes"):
        read_records(f)
    assert len(read_records(f, skip_bad_lines=True)) == 2
    assert len(read_records(f, max_line_bytes=6 * 2**20)) == 3
    multibyte = tmp_path / "utf8.jsonl"  # the limit counts bytes, not characters
    multibyte.write_text(json.dumps({"text": "é" * 300}, ensure_ascii=False) + "\n")
    with pytest.raises(LoraForgeError, match="utf8.jsonl:1: the line is 612 bytes long"):
        read_records(multibyte, max_line_bytes=400)


def test_csv_rows_longer_and_shorter_than_the_header_are_both_reported(tmp_path):
    f = tmp_path / "rows.csv"
    f.write_text("prompt,completion\nhi,there\nhello, world,again\nlonely\n")
    with pytest.raises(LoraForgeError, match=r"rows\.csv:3: 3 cells, but the header has 2"):
        read_records(f)
    short = tmp_path / "short.csv"
    short.write_text("prompt,completion\nhi,there\nlonely\n")
    with pytest.raises(LoraForgeError, match=r"short\.csv:3: missing field 'completion'"):
        read_records(short)
    assert [r.where for r in read_records(f, skip_bad_lines=True)] == [f"{f}:2"]


def test_txt_is_read_as_text_records_by_paragraph_or_by_line(tmp_path):
    f = tmp_path / "corpus.txt"
    f.write_text("First paragraph,\nstill the first.\n\n\nSecond one.\n  \nThird\n")
    recs = read_records(f)
    assert [(r.kind, r.where, r.text) for r in recs] == [
        ("text", f"{f}:1", "First paragraph,\nstill the first."), ("text", f"{f}:5", "Second one."),
        ("text", f"{f}:7", "Third")]
    assert [r.text for r in read_records(f, txt_lines=True)] == [
        "First paragraph,", "still the first.", "Second one.", "Third"]
    with pytest.raises(LoraForgeError, match=r"corpus\.txt:1: the paragraph is 33 bytes long"):
        read_records(f, max_line_bytes=20)


def test_txt_trains_packed_by_default(tmp_path, tiny_folder):
    from loraforge.train import TrainConfig, train

    f = tmp_path / "corpus.txt"
    f.write_text("\n\n".join(f"Paragraph {i} says something short." for i in range(12)) + "\n")
    cfg = TrainConfig(data=str(f), model=str(tiny_folder), out=str(tmp_path / "run"), device="cpu", rank=2,
                      max_steps=1, batch_size=4, max_len=64, eval_every=0, val_split=0)
    assert cfg.pack and not TrainConfig(data="a.jsonl").pack and not TrainConfig(data=str(f), pack=False).pack
    assert train(cfg).steps == 1


class CountingTokenizer:
    """The real tokenizer, noting the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self.tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self.tok, name)


@pytest.mark.parametrize("kind", ["text", "completion", "chat"])
def test_huge_records_are_tokenized_only_as_far_as_max_len(tok, kind):
    words = " ".join(f"word{i}" for i in range(200_000))  # ~1.5 MB
    rec = {"text": Record("text", "t:1", text=words),
           "completion": Record("completion", "t:1", prompt="Q: ", completion=words),
           "chat": Record("chat", "t:1", messages=(("user", "Say it all."), ("assistant", words)))}[kind]
    spy = CountingTokenizer(tok)
    (short,) = encode_records([rec], spy, max_len=64)
    assert spy.longest < 20_000
    (full,) = encode_records([rec], tok, max_len=10**7)  # the untruncated encoding, cut afterwards
    assert short.input_ids == full.input_ids[:64] and short.labels == full.labels[:64]


def test_the_txt_and_line_limit_flags_reach_the_config():
    from loraforge.cli import build_parser
    from loraforge.cli.train import config_from_args

    args = build_parser().parse_args(["train", "c.txt", "--txt-lines", "--max-line-bytes", "10", "--no-pack"])
    cfg = config_from_args(args)
    assert (cfg.txt_lines, cfg.max_line_bytes, cfg.pack) == (True, 10, False)
    assert config_from_args(build_parser().parse_args(["train", "c.txt"])).pack
