"""`loraforge bench --quick` on the tiny model: the harness runs end to end and writes the JSON keys.

A smoke test of the harness only: it never asserts a time or a memory figure.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

KEYS = ("lora_step_ratio_vs_peft", "qlora_step_ratio_vs_peft_bnb", "lora_peak_rss_ratio_vs_peft",
        "qlora_peak_rss_ratio_vs_peft_bnb", "lora_step_over_floor")


def quick_bench(tiny_folder, tmp_path, only: str):
    """Run `loraforge bench --quick --only ONLY` on the tiny model; (the finished process, results.json)."""
    out = tmp_path / "results.json"
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-m", "loraforge", "bench", "--quick", "--model", str(tiny_folder),
                        "--only", only, "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=230)
    assert r.returncode == 0, r.stderr
    return r, json.loads(out.read_text())


@pytest.mark.timeout(240)
def test_quick_bench_writes_results(tiny_folder, tmp_path):
    r, res = quick_bench(tiny_folder, tmp_path, "lora")
    for k in KEYS:
        assert k in res
    assert res["lora_step_ratio_vs_peft"] > 0 and res["lora_step_over_floor"] > 0
    assert res["first_step_loss"]["ok"], res["first_step_loss"]
    assert "LoRA step" in r.stdout and "floor:" in r.stdout


@pytest.mark.timeout(240)
def test_quick_bench_runs_the_qlora_rows_alone(tiny_folder, tmp_path):
    """`--only qlora` prints its own loss-parity line (it once read the LoRA rows' losses and crashed)."""
    r, res = quick_bench(tiny_folder, tmp_path, "qlora")
    assert res["qlora_step_ratio_vs_peft_bnb"] > 0
    assert "QLoRA first-step loss" in r.stdout and "LoRA first-step loss" not in r.stdout.replace("QLoRA", "")
