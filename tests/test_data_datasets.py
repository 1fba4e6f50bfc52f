"""Training data through the `datasets` library: save_to_disk folders (Dataset and DatasetDict), folders of
data files as load_dataset finds them, .arrow files, and (through files.py) .tsv and compressed text files,
with the same format rules and file + row error messages as every other file, and nothing from a hub."""

from __future__ import annotations

import gzip
import json
import lzma
import subprocess
import sys

import datasets
import pytest

from loraforge.data import read_records
from loraforge.errors import LoraForgeError

ALPACA = [{"instruction": "Add the numbers.", "input": "2, 2", "output": "4"},
          {"instruction": "Say hi.", "input": "", "output": "Hi!"},
          {"instruction": "Spell 7.", "input": "", "output": "007"}]
CHAT = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1+1?"},
                      {"role": "assistant", "content": "2"}]}]


def chats(rows):
    """The chat messages each alpaca row should become."""
    return [(("user", r["instruction"] + (f"\n\n{r['input']}" if r["input"] else "")), ("assistant", r["output"]))
            for r in rows]


def test_saved_dataset_folder(tmp_path):
    folder = tmp_path / "alpaca_ds"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(folder))
    records = read_records(folder)
    assert [r.messages for r in records] == chats(ALPACA)
    assert [r.where for r in records] == [f"{folder}:row {n}" for n in (1, 2, 3)]


def test_saved_chat_dataset_keeps_nested_messages(tmp_path):
    folder = tmp_path / "chat_ds"
    datasets.Dataset.from_list(CHAT).save_to_disk(str(folder))
    records = read_records(folder)
    assert [r.messages for r in records] == [tuple((m["role"], m["content"]) for m in row["messages"]) for row in CHAT]


def test_saved_dataset_dict_reads_the_train_split(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict(train=datasets.Dataset.from_list(ALPACA[:2]),
                         test=datasets.Dataset.from_list(ALPACA[2:])).save_to_disk(str(folder))
    records = read_records(folder)
    assert [r.messages for r in records] == chats(ALPACA[:2])
    assert records[0].where == f"{folder / 'train'}:row 1"  # the split's own folder on disk


def test_saved_dataset_dict_without_train_split_is_refused_naming_the_splits(tmp_path):
    folder = tmp_path / "dd"
    datasets.DatasetDict(validation=datasets.Dataset.from_list(ALPACA),
                         test=datasets.Dataset.from_list(ALPACA)).save_to_disk(str(folder))
    with pytest.raises(LoraForgeError, match=rf"^{folder}: a dataset with splits validation, test and no 'train' split"):
        read_records(folder)


@pytest.mark.parametrize("ext", ["parquet", "csv"])
def test_data_file_folder_reads_the_train_files_with_our_line_numbers(tmp_path, ext):
    # The layout of a hub dataset's repository cloned to disk: data/<split>-NNNNN-of-NNNNN.<ext>
    data = tmp_path / "snapshot" / "data"
    data.mkdir(parents=True)
    write = {"parquet": datasets.Dataset.to_parquet, "csv": datasets.Dataset.to_csv}[ext]
    kw = {"index": False} if ext == "csv" else {}
    write(datasets.Dataset.from_list(ALPACA[:2]), str(data / f"train-00000-of-00002.{ext}"), **kw)
    write(datasets.Dataset.from_list(ALPACA[2:]), str(data / f"train-00001-of-00002.{ext}"), **kw)
    write(datasets.Dataset.from_list(CHAT), str(data / f"test-00000-of-00001.{ext}"), **kw)
    records = read_records(tmp_path / "snapshot")
    assert [r.messages for r in records] == chats(ALPACA)  # "007" stays a string in CSV too
    first, last = (data / f"train-00000-of-00002.{ext}", data / f"train-00001-of-00002.{ext}")
    # files.py read each file: CSV rows by line (the header is line 1), Parquet rows by number
    assert [r.where for r in records] == ([f"{first}:2", f"{first}:3", f"{last}:2"] if ext == "csv" else
                                          [f"{first}:row 1", f"{first}:row 2", f"{last}:row 1"])


def test_tsv_and_compressed_files(tmp_path):
    tsv = tmp_path / "d.tsv"
    tsv.write_text("instruction\tinput\toutput\n" + "".join(f"{r['instruction']}\t{r['input']}\t{r['output']}\n"
                                                             for r in ALPACA))
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in ALPACA).encode()))
    xz = tmp_path / "d.csv.xz"
    xz.write_bytes(lzma.compress(tsv.read_text().replace(", ", " and ").replace("\t", ",").encode()))
    for path in (tsv, gz, xz):
        records = read_records(path)
        assert [r.messages for r in records] == chats(ALPACA if path != xz else [
            {**r, "input": r["input"].replace(", ", " and ")} for r in ALPACA]), path
        assert [r.where for r in records] == [f"{path}:{n}" for n in ((2, 3, 4) if path != gz else (1, 2, 3))]


def test_compressed_csv_keeps_the_cell_count_rule(tmp_path):
    # pandas (datasets' CSV reader) would shift this row's cells to fit the header; files.py refuses it
    path = tmp_path / "d.csv.gz"
    path.write_bytes(gzip.compress(b"instruction,input,output\nAdd.,2, 2,4\n"))
    with pytest.raises(LoraForgeError, match=rf"^{path}:2: 4 cells, but the header has 3 \(quote cells that hold "
                                             r"commas\)"):
        read_records(path)


def test_damaged_compressed_file(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(b"not gzip at all")
    with pytest.raises(LoraForgeError, match=rf"^{path}: cannot read"):
        read_records(path)


def test_arrow_file(tmp_path):
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ALPACA).save_to_disk(str(folder))
    arrow = next(folder.glob("*.arrow"))
    assert [r.messages for r in read_records(arrow)] == chats(ALPACA)


@pytest.mark.parametrize("kind", ["saved", "arrow", "parquet folder"])
def test_bad_row_is_named_by_file_and_row(tmp_path, kind):
    rows = [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]
    if kind == "saved":
        path = tmp_path / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
        where = f"{path}:row 2"
    elif kind == "arrow":
        folder = tmp_path / "ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(folder))
        path = next(folder.glob("*.arrow"))
        where = f"{path}:row 2"
    else:
        path = tmp_path / "folder"
        path.mkdir()
        datasets.Dataset.from_list(rows).to_parquet(str(path / "train.parquet"))
        where = f"{path / 'train.parquet'}:row 2"
    with pytest.raises(LoraForgeError, match=rf"^{where}: missing field 'completion'"):
        read_records(path)
    # skip_bad_lines works as for any other file
    assert [r.where for r in read_records(path, skip_bad_lines=True)] == [where[: -len("row 2")] + "row 1"]


def test_hub_name_is_refused_before_datasets_sees_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LoraForgeError, match=r"^tatsu-lab/alpaca: no such file or folder; training data is read "
                                             r"from local files and folders only, never fetched from a hub"):
        read_records("tatsu-lab/alpaca")


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraForgeError, match=rf"^{tmp_path / 'empty'}: not a dataset folder datasets can read"):
        read_records(tmp_path / "empty")


@pytest.mark.embedded
def test_train_cli_on_a_saved_dataset(tmp_path, tiny_folder):
    folder = tmp_path / "alpaca_ds"
    datasets.Dataset.from_list(ALPACA * 3).save_to_disk(str(folder))
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "loraforge", "train", str(folder), "--model", str(tiny_folder),
                        "--out", str(out), "--max-steps", "1", "--batch-size", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (out / "adapter_model.safetensors").is_file()


def test_without_the_datasets_library(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(LoraForgeError, match=rf"^{tmp_path}: reading a dataset folder or an .arrow file needs the "
                                             r"datasets library; pip install 'loraforge\[datasets\]'"):
        read_records(tmp_path)
