"""Resolve `--model SRC` and load it: the embedded default, a Hugging Face folder, or a .gguf file.

The model is built on the meta device and each tensor is read from safetensors and assigned in place
(``assign=True`` semantics), so loading never holds two copies of the weights. With ``quantize`` each
linear weight is quantized as soon as it is read: the full-precision model never exists whole. A
pre-quantized folder (``loraforge quantize``, or transformers + bitsandbytes 4-bit) is recognised by its
``*.weight.quant_state.*`` tensors and loaded as stored, without quantizing anything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import LoraForgeError
from ..quant import QUANT_TYPES, QuantLinear, state_from_tensors
from ..quant.checkpoint import (
    QuantSpec,
    group_of,
    quantize_weight,
    spec_from_config,
    stored_quantized,
    use_quant_linears,
)
from ..quant.linear import linear_names
from .budget import check_fits
from .config import ModelConfig
from .decoder import CausalLM
from .embedded import EMBEDDED_HUB_ID, EMBEDDED_NAME, converted_folder, embedded_gguf
from .experts_io import (
    expert_part,
    quantize_experts,
    renamed,
    stack_experts,
    stored_expert,
    use_quant_experts,
)
from .files import INDEX_FILE, read_json_object, shard_files, shown, source_record
from .linear import Linear
from .precision import DTYPES, resolve_precision  # noqa: F401  (DTYPES: cli/quantize)

log = logging.getLogger("loraforge")


@dataclass
class ModelSource:
    folder: Path  # a Hugging Face folder: config.json, *.safetensors, tokenizer files
    name: str  # what users call it (logs, the server's base model id)
    # what adapters record as base_model_name_or_path, as PEFT writes it: a hub id or an absolute path
    base_id: str = ""


def resolve_source(src: str | None) -> ModelSource:
    if src is None or src == "" or src == EMBEDDED_NAME or src.endswith("/" + EMBEDDED_NAME):
        return ModelSource(converted_folder(embedded_gguf()), EMBEDDED_NAME, EMBEDDED_HUB_ID)
    p = Path(src).expanduser()
    try:
        exists, is_file = p.exists(), p.is_file()
    except OSError as e:  # a name too long for the file system
        raise LoraForgeError(f"{shown(src)}: cannot read ({e.strerror or e})") from None
    if not exists:
        raise LoraForgeError(f"{shown(src)}: no such file or folder (pass a Hugging Face model folder or a .gguf file)")
    if is_file:
        if p.suffix != ".gguf":
            raise LoraForgeError(f"{src}: a model is a Hugging Face folder or a .gguf file, not a {p.suffix or 'plain'} file")
        folder = converted_folder(p)
        return ModelSource(folder, p.stem, str(folder.resolve()))
    if not (p / "config.json").exists():
        raise LoraForgeError(f"{src}: not a model folder (no config.json)")
    record = source_record(p)
    # the embedded model's converted folder, passed by its path, is still the hub model
    embedded = record.get("name") == EMBEDDED_NAME and "gguf" in record
    return ModelSource(p, record.get("name", p.name), EMBEDDED_HUB_ID if embedded else str(p.resolve()))


def weight_files(folder: Path) -> list[Path]:
    if (folder / INDEX_FILE).exists():
        return shard_files(folder)
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if not f.name.startswith("adapter_")]
    if files:
        return files
    if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
        raise LoraForgeError(
            f"{folder}: only pickle weights (*.bin/*.pt) found; loraforge loads safetensors only, because "
            "unpickling runs code. Convert with transformers: model.save_pretrained(dir, safe_serialization=True)"
        )
    raise LoraForgeError(f"{folder}: no weights (*.safetensors) in this folder")


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    raw = read_json_object(path, "config.json")
    try:
        return ModelConfig.from_hf(raw, str(path))
    except OverflowError as e:  # int(1e999): JSON numbers have no size limit
        raise LoraForgeError(f"{path}: a size field is not a finite number ({e})") from None


def _set_tensor(model: nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    old = getattr(mod, attr)
    if isinstance(old, nn.Parameter):
        setattr(mod, attr, nn.Parameter(t, requires_grad=old.requires_grad))
    else:
        setattr(mod, attr, t)


class WeightReader:
    """Every safetensors file of a checkpoint open at once, so a tensor is read by name wherever it is.

    A quantized weight's tensors (codes, scales, quant_state) may sit in different shards.
    `get` returns a tensor backed by safetensors' memory map (no copy; the model keeps it). `read`
    copies a tensor out with plain file reads, for a weight that is quantized and then dropped: pages
    touched through the map stay counted in this process's memory for as long as the map is open, so
    reading every weight that way would grow it by the whole checkpoint.
    """

    def __init__(self, files: list[Path], stack: contextlib.ExitStack):
        from safetensors import safe_open

        self.file_of: dict[str, Path] = {}  # tensor name -> its file, in file order
        self._handles, self._raw, self._header = {}, {}, {}
        for file in files:
            with self._errors(file):
                handle = self._handles[file] = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
                self.file_of.update(dict.fromkeys(handle.keys(), file))
                # safe_open has validated the header; keep its offsets for `read`
                raw = self._raw[file] = stack.enter_context(open(file, "rb", buffering=0))
                size = int.from_bytes(raw.read(8), "little")
                self._header[file] = (8 + size, json.loads(raw.read(size)))

    def get(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        with self._errors(file):
            return self._handles[file].get_tensor(key)

    def read(self, key: str) -> torch.Tensor:
        file = self.file_of[key]
        data_start, header = self._header[file]
        info = header[key]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            return self.get(key).clone()
        begin, end = info["data_offsets"]
        buf = torch.empty(end - begin, dtype=torch.uint8)
        view, raw = memoryview(buf.numpy()), self._raw[file]
        with self._errors(file):
            raw.seek(data_start + begin)
            done = 0
            while done < len(view):
                n = raw.readinto(view[done:])
                if not n:
                    raise LoraForgeError(f"{file}: truncated file (tensor {key} ends past the end)")
                done += n
        return buf.view(dtype).reshape(info["shape"])

    @staticmethod
    @contextlib.contextmanager
    def _errors(file: Path):
        from safetensors import SafetensorError

        try:
            yield
        except SafetensorError as e:
            raise LoraForgeError(f"{file}: corrupt safetensors file ({e})") from None
        except OSError as e:
            raise LoraForgeError(f"{file}: cannot read ({e})") from None


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _quantization(model: nn.Module, cfg: ModelConfig, folder: Path, stored: dict[str, str],
                  quantize: str | None, dt: torch.dtype, shapes: dict) -> tuple[QuantSpec | None, set[str]]:
    """Turn the linears that will hold quantized weights into QuantLinear placeholders (pre-quantized
    experts: one per expert, their shapes entered in `shapes` in place of the stacked weight's).

    Returns (spec, weights to quantize on load). A pre-quantized checkpoint (its tensors say which
    weights are stored quantized, config.json's quantization_config must agree) is read as it is;
    otherwise `quantize` picks every linear but lm_head (`linear_names`), each quantized once read.
    """
    where = str(folder / "config.json")
    declared = spec_from_config(cfg.hf_config, where)
    if declared is not None and not stored:
        raise LoraForgeError(f"{where}: quantization_config declares a quantized model, but the weights hold no "
                             "quantized tensors (no *.quant_state.* entries)")
    if stored:
        kinds = sorted(set(stored.values()))
        if quantize is not None and kinds != [quantize]:
            raise LoraForgeError(
                f"{folder}: the weights are already quantized ({', '.join(kinds)}); re-quantizing them as "
                f"{quantize} would add a second rounding error. Drop --quantize, or quantize the full-precision model"
            )
        linears = dict(model.named_modules())
        experts = [n for n in stored if stored_expert(n) is not None]  # MoE experts, one weight per expert
        for name in set(stored) - set(experts):
            mod = name.removesuffix(".weight")
            tied_head = cfg.tie_word_embeddings and mod == "lm_head"  # it is the embedding, never quantized
            if not name.endswith(".weight") or not isinstance(linears.get(mod), nn.Linear) or tied_head:
                raise LoraForgeError(f"{folder}: {name} is stored quantized, but it is not the weight of a linear layer")
        spec = declared or QuantSpec(kinds[0])
        use_quant_linears(model, [n.removesuffix(".weight") for n in stored if n not in experts], spec, dt)
        for name, shape in use_quant_experts(model, experts, spec, dt, str(folder)).items():
            shapes[name] = shape
            shapes.pop(name.rsplit(".", 2)[0], None)  # the stacked [E, out, in] weight they replace
        return spec, set()
    if quantize is None:
        return None, set()
    spec = QuantSpec(quantize)  # NF4 defaults to QLoRA's blocks of 64 with double quantization
    names = linear_names(model)
    use_quant_linears(model, names, spec, dt)
    return spec, {f"{n}.weight" for n in names}


def load_model(
    src: str | None = None,
    *,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
) -> tuple[CausalLM, object]:
    """Load a base model and its tokenizer. Returns (model, tokenizer); the model is frozen and in eval mode.

    `quantize` ("nf4", "fp4", "int8") quantizes every linear but lm_head as it is read. A pre-quantized
    folder (`loraforge quantize`, or transformers + bitsandbytes 4-bit) loads quantized without it.
    """
    t0 = time.perf_counter()
    source = resolve_source(src)
    cfg = read_config(source.folder)
    prec = resolve_precision(device, dtype)
    dev, dt = prec.device, prec.dtype
    if quantize is not None and quantize not in QUANT_TYPES:
        raise LoraForgeError(f"--quantize {quantize!r}: choose one of {', '.join(QUANT_TYPES)}")
    check_fits(cfg, dt, quantize or _declared_quant(cfg, source.folder), dev, str(source.folder / "config.json"))
    with torch.device("meta"):
        model = CausalLM(cfg)
    # Shapes as config.json implies them, taken before any linear becomes a QuantLinear.
    shapes = {k: tuple(t.shape) for k, t in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    seen: set[str] = set()
    with contextlib.ExitStack() as stack:
        reader = WeightReader(weight_files(source.folder), stack)
        stored = stored_quantized(reader.file_of)
        spec, on_load = _quantization(model, cfg, source.folder, stored, quantize, dt, shapes)
        owner = {key: group_of(key, stored) for key in reader.file_of} if stored else {}
        members: dict[str, list[str]] = {}  # stored quantized weight -> the names of its tensors
        experts: dict[tuple[str, int, str], torch.Tensor] = {}  # MoE: (layer, expert, part) -> its weight
        for key, group in owner.items():
            if group is not None:
                members.setdefault(group, []).append(key)
        for key, file in reader.file_of.items():
            if key.endswith("rotary_emb.inv_freq") or (cfg.tie_word_embeddings and key == "lm_head.weight"):
                continue
            if (group := owner.get(key)) is not None:
                # a pre-quantized weight: read all its tensors when its quant_state entry comes by
                if key.startswith(group + ".quant_state."):
                    tensors = {k: reader.get(k) for k in members[group]}
                    _load_stored(model, file, group, tensors, shapes[group], dev)
                    seen.add(group)
                continue
            if cfg.num_experts and (part := expert_part(key)) is not None:
                experts[part] = reader.get(key)  # stacked per layer below
                continue
            name = renamed(key) if cfg.num_experts else key
            if name not in shapes:
                raise LoraForgeError(f"{file}: unexpected tensor {key!r}; is this a {cfg.model_type} checkpoint?")
            t = reader.read(key) if name in on_load else reader.get(key)
            _check_shape(file, key, t, shapes[name])
            t = t.to(device=dev, dtype=dt if t.is_floating_point() else t.dtype)
            if name in on_load:
                # quantized now: only this one layer ever exists in full precision
                model.get_submodule(name.removesuffix(".weight")).set_quant_state(quantize_weight(t, spec))
            else:
                _set_tensor(model, name, t)
            seen.add(name)
        for name, t in stack_experts(experts, cfg.num_experts, str(source.folder)).items():
            _check_shape(source.folder, name, t, shapes.get(name))
            _set_tensor(model, name, t.to(device=dev, dtype=dt))
            seen.add(name)
    if cfg.num_experts and on_load:  # QLoRA quantizes the experts too (loaded whole first, then quantized)
        quantize_experts(model, spec, dt)
    missing = sorted(set(shapes) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise LoraForgeError(f"{source.folder}: weights missing from the checkpoint: {', '.join(missing[:3])}{more}")
    model.tie_weights()
    model.init_rope(dev)  # buffers built on meta hold no data
    model.requires_grad_(False)
    model.eval()
    model.name_or_path = source.name
    model.base_model_name_or_path = source.base_id or source.name
    model.source_folder = source.folder
    tok = load_tokenizer(source.folder)
    n = count_parameters(model)
    how = "" if spec is None else f", {spec.quant_type} base" + (" (pre-quantized)" if stored else "")
    log.info(
        "loaded %s: %s parameters, %s on %s%s (%.1fs)%s",
        source.name, human(n), str(dt).replace("torch.", ""), dev, how, time.perf_counter() - t0,
        f"; {prec.why}" if prec.why.startswith("auto") else "",
    )
    return model, tok


def _check_shape(file, key: str, t: torch.Tensor, shape: tuple | None) -> None:
    if shape is None:
        raise LoraForgeError(f"{file}: unexpected tensor {key!r}")
    if tuple(t.shape) != shape:
        raise LoraForgeError(f"{file}: tensor {key} has shape {tuple(t.shape)}, config.json implies {shape}")


def _declared_quant(cfg: ModelConfig, folder: Path) -> str | None:
    spec = spec_from_config(cfg.hf_config, str(folder / "config.json"))
    return spec.quant_type if spec is not None else None


def _load_stored(model: nn.Module, file: Path, name: str, tensors: dict[str, torch.Tensor], shape: tuple,
                 dev: torch.device) -> None:
    """Fill the QuantLinear placeholder of weight `name` from its stored tensors (codes, scales, quant_state)."""
    try:
        state = state_from_tensors(tensors, name, dev)
    except LoraForgeError as e:
        raise LoraForgeError(f"{file}: {e}") from None
    if tuple(state.shape) != shape:
        raise LoraForgeError(f"{file}: quantized weight {name} has shape {tuple(state.shape)}, "
                             f"config.json implies {shape}")
    model.get_submodule(name.removesuffix(".weight")).set_quant_state(state)


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # noqa: BLE001
        raise LoraForgeError(f"{folder}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def count_parameters(model: nn.Module) -> int:
    """Parameters as stored (a tied embedding counts once; a quantized weight counts its in x out values)."""
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, QuantLinear):  # its weight is packed codes in buffers, not a parameter
            n += m.in_features * m.out_features
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def human(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(int(n))


__all__ = ["load_model", "load_tokenizer", "resolve_source", "count_parameters", "Linear", "ModelSource"]
