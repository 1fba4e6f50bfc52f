"""`loraforge compare`: every row measured (or its skip reason), the numbers consistent with the model's
shapes, the report and figure written; user mistakes are one line before any training starts."""

from __future__ import annotations

import contextlib
import io
import json

import pytest

from loraforge.cli import main
from loraforge.compare import report
from loraforge.compare.full import plan, skip_reason

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
VIRTUAL_TOKENS, RANK = 3, 4


def write_dates(path, n, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            y, m, d = 1950 + i, 1 + i % 12, 1 + i % 28
            msgs = [{"role": "user", "content": f"Convert to ISO date: {MONTHS[m - 1]} {d}, {y}"},
                    {"role": "assistant", "content": f"{y}-{m:02d}-{d:02d}"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory, tiny_folder):
    """One comparison on the tiny random Llama, shared by the tests that read its outputs."""
    tmp = tmp_path_factory.mktemp("compare")
    data, val = write_dates(tmp / "train.jsonl", 16), write_dates(tmp / "val.jsonl", 4, start=40)
    out = tmp / "cmp"
    argv = ["compare", str(data), "--val", str(val), "--model", str(tiny_folder), "--device", "cpu",
            "--max-steps", "3", "--eval-every", "1", "--batch-size", "4", "--rank", str(RANK),
            "--num-virtual-tokens", str(VIRTUAL_TOKENS), "--out", str(out)]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(argv)
    return out, rc, buf.getvalue()


@pytest.fixture(scope="module")
def results(compared):
    out, _, _ = compared
    return json.loads((out / "compare.json").read_text())


def test_every_row_has_every_column(compared, results):
    out, rc, _ = compared
    assert rc == 0
    rows = results["rows"]
    assert list(rows) == ["base", "lora", "qlora", "prefix", "full"]
    for name, r in rows.items():
        assert "error" not in r and "skipped" not in r, (name, r)
    md = (out / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0] == "| " + " | ".join(report.COLUMNS) + " |"
    assert len(table) == 1 + len(rows)
    for line in table[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(report.COLUMNS) and all(cells), line
        if not line.startswith("| base"):  # the untrained row has no adapter, training peak or step time
            assert "—" not in cells, line
    assert "## Trade-offs" in md and "in the same 3 steps" in md
    png = (out / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    for method in ("lora", "qlora", "prefix"):
        assert (out / method / "adapter_model.safetensors").is_file()
    for name in ("lora", "qlora", "prefix", "full"):
        assert len(rows[name]["curve"]["val"]) == 3 and rows[name]["steps"] == 3


def test_numbers_follow_from_the_model_shapes(results, tiny_folder):
    rows = results["rows"]
    c = json.loads((tiny_folder / "config.json").read_text())
    h, inter, L = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    D = c["head_dim"]
    q, kv = c["num_attention_heads"] * D, c["num_key_value_heads"] * D
    # (in, out) of every projection that "all-linear" wraps: q, k, v, o, gate, up, down
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]
    assert rows["lora"]["trainable"] == L * sum(RANK * (i + o) for i, o in shapes)
    assert rows["qlora"]["trainable"] == rows["lora"]["trainable"]
    assert rows["prefix"]["trainable"] == VIRTUAL_TOKENS * L * 2 * c["num_key_value_heads"] * D
    n = rows["base"]["model_params"]
    assert rows["full"]["trainable"] == n and rows["lora"]["model_params"] == n
    fp32 = 4 * n
    assert rows["base"]["base_bytes"] == fp32 == rows["lora"]["base_bytes"] == rows["full"]["base_bytes"]
    assert rows["qlora"]["base_bytes"] < rows["lora"]["base_bytes"]
    # the adapter file holds the trained tensors in fp32, plus a header and the config
    for m in ("lora", "prefix"):
        assert 4 * rows[m]["trainable"] < rows[m]["adapter_bytes"] < 4 * rows[m]["trainable"] + 20_000
    for name in ("lora", "qlora", "prefix", "full"):
        r = rows[name]
        assert r["peak_rss"] > r["base_bytes"] and r["step_s"] > 0 and r["tokens_per_s"] > 0
        assert r["em_total"] == 4 and 0 <= r["em_correct"] <= 4
        assert r["val_loss"] == r["curve"]["val"][-1][1]
    lrs = results["settings"]["lr"]
    assert lrs["prefix"] > lrs["lora"] > lrs["full"]


def test_table_on_stdout_and_skipped_full_row(compared, results):
    out, _, stdout = compared
    assert stdout.strip() == report.table(results)
    assert report.table(results) in (out / "report.md").read_text()
    # A machine without room for full fine-tuning: the row states what it needs and what there is.
    p = plan(n_params=135_000_000, activations=500_000_000, available=1_000_000_000)
    assert not p["fits"] and skip_reason(p) == "skipped: needs ~2.7 GB, 1.0 GB available"
    skipped = dict(results, rows={**results["rows"], "full": {"skipped": skip_reason(p),
                                                              "plan": {**p, "activations_from": "formula"}}})
    md = report.render(skipped)
    row = next(line for line in md.splitlines() if line.startswith("| full fine-tuning"))
    assert "skipped: needs ~2.7 GB, 1.0 GB available" in row
    assert "Full fine-tuning was not run" in md
    assert plan(n_params=1000, activations=0, available=16_000)["fits"]


@pytest.mark.parametrize("argv, message", [
    (["--methods", "lora,dora"], "unknown method 'dora'"),
    (["--methods", "lora,lora"], "listed twice"),
    (["--lr", "prefix=fast"], "--lr 'prefix=fast'"),
    (["--dtype", "bfloat16"], "float32"),
])
def test_bad_flags_are_one_line(tmp_path, tiny_folder, capsys, argv, message):
    data = write_dates(tmp_path / "d.jsonl", 4)
    rc = main(["compare", str(data), "--model", str(tiny_folder), "--out", str(tmp_path / "o"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and message in err[-1] and err[-1].startswith("loraforge: error:")
    assert not (tmp_path / "o").exists()


def test_refuses_a_used_out_folder_and_bad_data(tmp_path, tiny_folder, capsys):
    data = write_dates(tmp_path / "d.jsonl", 4)
    (tmp_path / "o" / "lora").mkdir(parents=True)
    assert main(["compare", str(data), "--model", str(tiny_folder), "--out", str(tmp_path / "o")]) == 2
    assert "already exists" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{not json\n')
    assert main(["compare", str(bad), "--model", str(tiny_folder), "--out", str(tmp_path / "b")]) == 2
    assert "bad.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "b" / "logs").exists()


@pytest.mark.usefixtures("isolated_rng")  # prepare() draws the adapters' init from torch's generator
def test_learning_rates_and_trainable_share_are_the_ones_train_uses(compared, results, tiny_folder):
    import re

    from loraforge.compare import DEFAULT_LR
    from loraforge.lora import trainable_report
    from loraforge.model import load_model
    from loraforge.train import TrainConfig, prepare

    out, _, _ = compared
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")]
    for method, label in (("lora", "LoRA"), ("prefix", "prefix tuning")):
        cfg = TrainConfig(data="d.jsonl", method=method, rank=RANK, num_virtual_tokens=VIRTUAL_TOKENS)
        assert DEFAULT_LR[method] == results["settings"]["lr"][method] == cfg.lr
        model, _ = load_model(str(tiny_folder), device="cpu", dtype="float32")
        prepare(model, cfg)
        percent = re.search(r"\((\d+\.\d+%)\)", trainable_report(model)).group(1)
        (row,) = [line for line in table if line.startswith(f"| {label} ")]
        assert f"({percent})" in row, (row, trainable_report(model))
