"""TrainConfig: typed fields checked at construction, YAML 1:1, flags override YAML; the lr schedule."""

from __future__ import annotations

import math

import pytest
import yaml

from loraforge.cli import build_parser
from loraforge.cli.train import config_from_args
from loraforge.errors import LoraForgeError
from loraforge.train.config import TrainConfig
from loraforge.train.schedule import lr_at


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def write(path, text):
    path.write_text(text)
    return path


def test_yaml_maps_onto_fields_and_flags_override_only_what_was_given(tmp_path):
    cfg_file = write(tmp_path / "run.yaml", "data: a.jsonl\nrank: 8\nlr: 2e-4\nbatch_size: 4\npack: true\n"
                     "targets: [q_proj, v_proj]\nmax_steps: 50\n")
    cfg = config_from_args(parse("--config", str(cfg_file), "--rank", "4", "--no-pack"))
    assert cfg.rank == 4  # flag beats YAML
    assert cfg.pack is False  # a boolean flag can switch a YAML `true` off
    assert cfg.batch_size == 4 and cfg.max_steps == 50  # YAML kept where no flag was given
    assert cfg.lr == 2e-4 and isinstance(cfg.lr, float)  # YAML 1.1 reads `2e-4` as a string: coerced
    assert cfg.targets == ["q_proj", "v_proj"]
    assert cfg.dropout == TrainConfig().dropout  # neither YAML nor flag: the dataclass default
    assert cfg.data == "a.jsonl"


def test_positional_data_and_run_length_flags_replace_yaml(tmp_path):
    cfg_file = write(tmp_path / "run.yaml", "data: a.jsonl\nmax_steps: 50\n")
    cfg = config_from_args(parse("b.jsonl", "--config", str(cfg_file), "--epochs", "2"))
    assert cfg.data == "b.jsonl"
    assert cfg.epochs == 2.0 and cfg.max_steps is None  # --epochs replaces the YAML's max_steps


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = TrainConfig(data="x.jsonl", rank=4, targets=["q_proj"], epochs=1.5, val=None)
    again = TrainConfig.from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_unknown_yaml_key_is_an_error_naming_it(tmp_path):
    cfg_file = write(tmp_path / "bad.yaml", "data: a.jsonl\nrnak: 8\n")
    with pytest.raises(LoraForgeError, match=r"bad\.yaml: unknown key 'rnak' \(did you mean 'rank'\?\)"):
        TrainConfig.from_yaml(cfg_file)


@pytest.mark.parametrize("text, match", [
    ("rank: 0\n", "rank 0: must be at least 1"),
    ("rank: eight\n", "rank must be an integer"),
    ("rank: true\n", "rank must be an integer"),
    ("lr: -1\n", "lr -1.0: must be positive"),
    ("dropout: 1.0\n", "dropout 1.0: must be in"),
    ("method: full\n", "method 'full': choose one of lora, qlora, prefix"),
    ("max_steps: 10\nepochs: 2\n", "max_steps or epochs, not both"),
    ("val_split: 1.5\n", "val_split 1.5"),
    ("pack: maybe\n", "pack must be true or false"),
    ("- rank\n", "expected a mapping"),
    ("rank: [\n", r"bad\.yaml:\d+: not valid YAML"),
])
def test_invalid_values_are_one_clear_error(tmp_path, text, match):
    with pytest.raises(LoraForgeError, match=match):
        TrainConfig.from_yaml(write(tmp_path / "bad.yaml", text))


def test_validation_happens_at_construction():
    with pytest.raises(LoraForgeError, match="grad_accum 0"):
        TrainConfig(grad_accum=0)
    with pytest.raises(LoraForgeError, match="format 'xml'"):
        TrainConfig(format="xml")


def test_flag_values_are_validated_too():
    with pytest.raises(LoraForgeError, match="^--batch-size 0: must be at least 1$"):  # named as typed
        config_from_args(parse("a.jsonl", "--batch-size", "0"))


def test_targets_flag_forms():
    assert config_from_args(parse("a.jsonl", "--targets", "all-linear")).targets == "all-linear"
    assert config_from_args(parse("a.jsonl", "--targets", "q_proj,v_proj")).targets == ["q_proj", "v_proj"]
    assert config_from_args(parse("a.jsonl", "--targets", "q_proj")).targets == ["q_proj"]
    assert config_from_args(parse("a.jsonl", "--targets", r".*\.(q|v)_proj")).targets == r".*\.(q|v)_proj"


def test_schedule_warms_up_linearly_then_decays_by_cosine():
    base, warmup, total = 1e-3, 10, 110
    lrs = [lr_at(s, base, warmup, total) for s in range(total)]
    assert lrs[0] == pytest.approx(base / warmup)
    assert lrs[warmup - 1] == pytest.approx(base) and lrs[warmup] == pytest.approx(base)
    assert all(a < b for a, b in zip(lrs[:warmup - 1], lrs[1:warmup], strict=True))  # rising
    assert all(a >= b for a, b in zip(lrs[warmup:], lrs[warmup + 1:], strict=False))  # falling
    mid = warmup + (total - warmup) // 2
    assert lrs[mid] == pytest.approx(base / 2)  # cosine: half-way down at half the decay
    assert 0 < lrs[-1] < base * 1e-3
    assert lr_at(0, base, 0, 5) == base and math.isclose(lr_at(4, base, 0, 5), base * 0.5 * (1 + math.cos(math.pi * 0.8)))


def test_learning_rate_defaults_per_method_and_explicit_wins():
    from loraforge.train.config import TrainConfig

    assert TrainConfig(method="lora").lr == 2e-4
    assert TrainConfig(method="qlora").lr == 2e-4
    assert TrainConfig(method="prefix").lr == 3e-2
    assert TrainConfig(method="prefix", prefix_projection=True).lr == 1e-3
    assert TrainConfig(method="prefix", lr=5e-3).lr == 5e-3
