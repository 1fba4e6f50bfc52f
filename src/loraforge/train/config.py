"""TrainConfig: everything a training run depends on, typed and checked when it is built.

A YAML file maps 1:1 onto the fields (an unknown key is an error naming it); command-line flags
override the YAML, and the resolved config is written to DIR/config.yaml so a run can be repeated.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LoraForgeError

METHODS = ("lora", "qlora", "prefix")
STRATEGIES = ("ddp", "fsdp")  # train.distributed.STRATEGIES, without importing torch here
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")  # model.precision's, without importing torch here
DATA_FORMATS = ("chat", "alpaca", "completion", "text")  # loraforge.data.FORMATS, without importing it


def default_lr(method: str, prefix_projection: bool = False) -> float:
    """Peak learning rate by method. A bare prefix table sits far from the gradient's useful scale: on the
    embedded model 12 steps moved the pirate validation loss 3.47 -> 3.37 at 2e-4 but -> 1.97 at 3e-2;
    through the MLP reparameterisation 1e-3 does as well. LoRA's 2e-4 is the QLoRA paper's setting."""
    if method == "prefix":
        return 1e-3 if prefix_projection else 3e-2
    return 2e-4


@dataclass
class TrainConfig:
    data: str | None = None  # training file: .jsonl, .json, .csv, .parquet, or .txt (plain text)
    out: str | None = None  # output folder (default: runs/<data file stem>)
    model: str | None = None  # Hugging Face folder or .gguf (default: the embedded SmolLM2-135M-Instruct)
    device: str | None = None  # default: cuda if available, else cpu
    # compute dtype of the frozen base: auto = bf16 on CUDA and on CPUs that multiply bf16 fast, else fp32.
    # The trained weights and AdamW's state stay fp32 whatever this is (mixed precision).
    dtype: str = "auto"
    save_dtype: str = "float32"  # the adapter file's tensors: float32 (as PEFT writes them) or bfloat16
    method: str = "lora"  # lora, qlora (NF4 base + LoRA) or prefix
    # LoRA
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: str | list[str] = "all-linear"  # "all-linear", a regex, or a list of module names
    # MoE expert weights to adapt as PEFT's target_parameters (e.g. mlp.experts.gate_up_proj); needs dropout 0
    target_parameters: list[str] | None = None
    # prefix tuning
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # train through an MLP (Li & Liang), folded away on save
    # optimisation
    max_steps: int | None = None  # optimizer steps; give this or epochs (default: 1 epoch)
    epochs: float | None = None
    lr: float | None = None  # default per method: default_lr()
    batch_size: int = 8
    grad_accum: int = 1
    warmup_steps: int | None = None  # default: 5% of the steps
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    grad_checkpointing: bool = False
    seed: int = 0
    # several processes (torchrun): ddp = replicate the model; fsdp = FSDP2, base and adapter sharded
    strategy: str = "ddp"
    # data
    format: str | None = None  # chat, alpaca, completion or text (default: detected from the first record)
    max_len: int = 1024
    train_on_prompt: bool = False
    pack: bool | None = None  # default: on for a .txt corpus (many short paragraphs), off otherwise
    skip_bad_lines: bool = False
    txt_lines: bool = False  # a .txt file: one record per line instead of per blank-line-separated paragraph
    max_line_bytes: int = 4 * 2**20  # a longer record (JSONL line, CSV row, paragraph) is a bad record
    val: str | None = None  # a validation file; when set, val_split is not used
    val_split: float = 0.1
    # bookkeeping
    eval_every: int = 50  # 0 = only at the end
    save_every: int = 100  # 0 = only at the end
    keep_checkpoints: int = 2

    def __post_init__(self):
        # YAML and callers hand us loosely typed values (YAML 1.1 reads `2e-4` as a string): coerce each
        # to its declared type, or fail naming the field.
        hints = typing.get_type_hints(TrainConfig)
        for f in dataclasses.fields(self):
            setattr(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        if self.lr is None:
            self.lr = default_lr(self.method, self.prefix_projection)
        if self.pack is None:
            self.pack = bool(self.data) and Path(self.data).suffix.lower() == ".txt"
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, what: str):
            raise _field_error(name, f"config: {name} {getattr(self, name)!r}: {what}")

        if self.method not in METHODS:
            bad("method", f"choose one of {', '.join(METHODS)}")
        if self.strategy not in STRATEGIES:
            bad("strategy", f"choose one of {', '.join(STRATEGIES)}")
        if self.dtype not in DTYPE_CHOICES:
            bad("dtype", f"choose one of {', '.join(DTYPE_CHOICES)}")
        if self.save_dtype not in ("float32", "bfloat16"):
            bad("save_dtype", "choose float32 or bfloat16")
        if self.format is not None and self.format not in DATA_FORMATS:
            bad("format", f"choose one of {', '.join(DATA_FORMATS)}")
        for name in ("rank", "num_virtual_tokens", "batch_size", "grad_accum", "keep_checkpoints"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        for name in ("eval_every", "save_every", "seed"):
            if getattr(self, name) < 0:
                bad(name, "must be 0 or more")
        if self.max_len < 2:
            bad("max_len", "must be at least 2 tokens")
        if self.max_line_bytes < 1:
            bad("max_line_bytes", "must be at least 1")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            bad("alpha", "must be positive")
        if not 0 <= self.dropout < 1:
            bad("dropout", "must be in [0, 1)")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", "must be positive")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            bad("max_grad_norm", "must be positive")
        if not self.weight_decay >= 0:
            bad("weight_decay", "must be 0 or more")
        if not 0 <= self.val_split < 1:
            bad("val_split", "must be a fraction in [0, 1)")
        if self.max_steps is not None and self.max_steps < 1:
            bad("max_steps", "must be at least 1")
        if self.epochs is not None and not (self.epochs > 0 and math.isfinite(self.epochs)):
            bad("epochs", "must be positive")
        if self.max_steps is not None and self.epochs is not None:
            raise LoraForgeError("config: give max_steps or epochs, not both")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            bad("warmup_steps", "must be 0 or more")
        if isinstance(self.targets, list) and (not self.targets or not all(self.targets)):
            bad("targets", "must be 'all-linear', a regex, or a non-empty list of module names")
        if self.target_parameters is not None:
            if not isinstance(self.target_parameters, list) or not all(
                    isinstance(t, str) and t for t in self.target_parameters):
                bad("target_parameters", "must be a list of parameter names such as mlp.experts.gate_up_proj")
            if self.target_parameters and self.dropout != 0:
                bad("dropout", "must be 0 with target_parameters (PEFT applies no dropout to expert weights)")

    # -- building one ---------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config", flags: set[str] = frozenset()) -> TrainConfig:
        """A config from `values`; errors name `where` (the YAML file), or the flag for a field in `flags`
        (the ones given on the command line)."""
        known = config_fields()
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(known)}"
                raise LoraForgeError(f"{where}: unknown key {key!r}{hint}")
        try:
            return cls(**values)
        except LoraForgeError as e:
            msg = str(e).removeprefix("config: ")
            name = getattr(e, "field", None)
            if name in flags:  # the user typed this one as a flag: name the flag, as argparse would
                raise LoraForgeError(f"--{name.replace('_', '-')} {msg.removeprefix(name + ' ')}") from None
            raise LoraForgeError(f"{where}: {msg}") from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
        """Read a YAML file of TrainConfig fields, then apply `overrides` (the flags the user passed)."""
        values = read_yaml(path)
        return cls.from_dict(merge(values, overrides or {}), where=str(path), flags=set(overrides or {}))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    # -- derived values -------------------------------------------------------------------------------------
    def with_absolute_paths(self) -> TrainConfig:
        """This config with data, val, out and a model path made absolute (a model that is not a path,
        the embedded one, stays as it is)."""
        def absolute(v: str | None) -> str | None:
            return os.path.abspath(os.path.expanduser(v)) if v else v

        model = self.model
        if model and Path(model).expanduser().exists():
            model = absolute(model)
        return dataclasses.replace(self, data=absolute(self.data), val=absolute(self.val), model=model,
                                   out=absolute(str(self.out_dir())))

    def out_dir(self) -> Path:
        if self.out:
            return Path(self.out)
        if not self.data:
            raise LoraForgeError("config: no out folder and no data file to name one after")
        return Path("runs") / Path(self.data).stem


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise LoraForgeError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise LoraForgeError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise LoraForgeError(f"{path}: expected a mapping of TrainConfig fields, got {type(raw).__name__}")
    return raw


def merge(values: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`values` with `overrides` on top. The two run lengths exclude each other: a flag choosing one
    drops the other from the YAML."""
    out = dict(values)
    if "epochs" in overrides and "max_steps" not in overrides:
        out.pop("max_steps", None)
    if "max_steps" in overrides and "epochs" not in overrides:
        out.pop("epochs", None)
    out.update(overrides)
    return out


# -- type checking ------------------------------------------------------------------------------------------
def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's declared type, or a LoraForgeError naming the field."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise _field_error(name, f"config: {name} must be set (got null)")
    for t in options:
        if t is type(None):
            continue
        try:
            return _as(value, t)
        except (TypeError, ValueError):
            continue
    want = " or ".join(_type_name(t) for t in options if t is not type(None))
    raise _field_error(name, f"config: {name} must be {want}, got {value!r}")


def _field_error(name: str, message: str) -> LoraForgeError:
    """A LoraForgeError that knows its field, so from_dict can name the flag that set it."""
    e = LoraForgeError(message)
    e.field = name
    return e


def _as(value: Any, t: Any) -> Any:
    origin = typing.get_origin(t)
    if origin is list:
        (item,) = typing.get_args(t)
        if not isinstance(value, (list, tuple)):
            raise TypeError("not a list")
        return [_as(v, item) for v in value]
    if t is bool:
        if isinstance(value, bool):
            return value
        raise TypeError("not a boolean")
    if t is int:
        if isinstance(value, bool):
            raise TypeError("a boolean is not an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            return int(value.strip())
        raise TypeError("not an integer")
    if t is float:
        if isinstance(value, bool):
            raise TypeError("a boolean is not a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `2e-4` (no dot) as a string
            return float(value.strip())
        raise TypeError("not a number")
    if t is str:
        if isinstance(value, str):
            return value
        raise TypeError("not a string")
    raise TypeError(f"unsupported type {t}")


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is list:
        return "a list of " + _type_name(typing.get_args(t)[0]).removeprefix("a ").removeprefix("an ") + "s"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(t, str(t))


def config_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]
