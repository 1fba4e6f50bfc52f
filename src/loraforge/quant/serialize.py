"""The on-disk layout of a quantized weight: the tensors bitsandbytes / transformers save for a Linear4bit.

For a weight named `name` (e.g. "model.layers.0.self_attn.q_proj.weight"):

    name                                    uint8 [ceil(n/2), 1]   packed 4-bit codes
    name.absmax                             float32 [n_blocks], or uint8 [n_blocks] if double-quantized
    name.quant_map                          float32 [16]           the nf4 / fp4 table
    name.nested_absmax                      float32 [ceil(n_blocks/256)]   (double quant only)
    name.nested_quant_map                   float32 [256]                  (double quant only)
    name.quant_state.bitsandbytes__nf4      uint8 [k]: UTF-8 JSON ("__fp4" for fp4)

The JSON holds the non-tensor fields, in this order, as `json.dumps` writes them:
{"quant_type", "blocksize", "dtype", "shape"} and, with double quant, {"nested_blocksize",
"nested_dtype", "nested_offset"}. Ours is byte-identical to `QuantState.as_dict(packed=True)`.

INT8 (our own format; bitsandbytes has no blockwise int8 weight type, and rejects this key):

    name                                    int8 [*shape]          codes, x ~= code * absmax / 127
    name.absmax (+ nested_* when double-quantized, exactly as above)
    name.quant_state.loraforge__int8        uint8 [k]: JSON with the same fields, quant_type "int8"

There is no quant_map for int8: the codes are linear.
"""

import json
import math

import torch

from loraforge.errors import LoraForgeError
from loraforge.quant.functional import BLOCKSIZES, FLOAT_DTYPES, QuantState

_NAMESPACE = {"nf4": "bitsandbytes", "fp4": "bitsandbytes", "int8": "loraforge"}
_STATE_KEYS = {f"quant_state.{ns}__{qt}": qt for qt, ns in _NAMESPACE.items()}
_TENSOR_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")  # "float32", "bfloat16", "float16"


def _pack_json(fields: dict) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(fields).encode("utf-8")), dtype=torch.uint8)


def state_to_tensors(state: QuantState, name: str) -> dict[str, torch.Tensor]:
    """The serialized tensors of one quantized weight, keyed `name`, `name.absmax`, ... (see module doc)."""
    fields = {
        "quant_type": state.quant_type,
        "blocksize": state.blocksize,
        "dtype": _dtype_name(state.dtype),
        "shape": list(state.shape),
    }
    out = {name: state.data, f"{name}.absmax": state.absmax}
    if state.quant_map is not None:
        out[f"{name}.quant_map"] = state.quant_map
    if state.double_quant:
        out[f"{name}.nested_absmax"] = state.nested_absmax
        out[f"{name}.nested_quant_map"] = state.nested_quant_map
        fields["nested_blocksize"] = state.nested_blocksize
        fields["nested_dtype"] = "float32"  # the nested statistics are always float32
        fields["nested_offset"] = state.offset.item()
    out[f"{name}.quant_state.{_NAMESPACE[state.quant_type]}__{state.quant_type}"] = _pack_json(fields)
    return out


def _fail(name: str, problem: str):
    raise LoraForgeError(f"Quantized weight '{name}': {problem}.")


def _read_fields(name: str, tensors: dict[str, torch.Tensor]) -> dict:
    found = [key for key in tensors if key.startswith(f"{name}.quant_state.")]
    if not found:
        _fail(name, f"missing '{name}.quant_state.bitsandbytes__nf4' (or __fp4 / loraforge__int8)")
    if len(found) > 1:
        _fail(name, f"has {len(found)} quant_state entries ({', '.join(found)}), expected one")
    suffix = found[0][len(name) + 1 :]
    if suffix not in _STATE_KEYS:
        _fail(name, f"unknown quantization type in '{found[0]}' (known: nf4, fp4, int8)")
    raw = tensors[found[0]]
    try:
        fields = json.loads(bytes(raw.to("cpu", torch.uint8).reshape(-1).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        _fail(name, f"'{found[0]}' is not valid JSON ({err})")
    if not isinstance(fields, dict):
        _fail(name, f"'{found[0]}' does not hold a JSON object")
    if fields.get("quant_type") != _STATE_KEYS[suffix]:
        _fail(name, f"quant_type {fields.get('quant_type')!r} in '{found[0]}' does not match its key")
    return fields


def _as_bytes(data: torch.Tensor) -> torch.Tensor:
    # bitsandbytes can store the packed codes in a wider dtype (quant_storage, used by FSDP); the
    # bytes are the same, so reinterpret them.
    return data if data.dtype == torch.uint8 else data.contiguous().view(-1).view(torch.uint8)


def state_from_tensors(
    tensors: dict[str, torch.Tensor], name: str, device: torch.device | str | None = None
) -> QuantState:
    """Read one quantized weight written by `state_to_tensors` or by bitsandbytes / transformers.

    `tensors` may hold other weights too; only `name` and `name.*` are read. Raises LoraForgeError
    naming the weight when a tensor is missing, has the wrong shape or dtype, or the JSON is bad.
    """
    fields = _read_fields(name, tensors)
    quant_type = fields["quant_type"]
    for key in ("blocksize", "dtype", "shape"):
        if key not in fields:
            _fail(name, f"the quant_state JSON has no '{key}' field")
    shape, blocksize = fields["shape"], fields["blocksize"]
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape)):
        _fail(name, f"shape {shape!r} is not a list of positive integers")
    if blocksize not in BLOCKSIZES:
        _fail(name, f"blocksize {blocksize!r} is not one of {BLOCKSIZES}")
    dtype = getattr(torch, str(fields["dtype"]), None)
    if dtype not in FLOAT_DTYPES:
        _fail(name, f"dtype {fields['dtype']!r} is not float32, bfloat16 or float16")

    def get(key: str) -> torch.Tensor:
        full = f"{name}.{key}" if key else name
        if full not in tensors:
            _fail(name, f"missing tensor '{full}'")
        return tensors[full].to(device) if device is not None else tensors[full]

    def check(key: str, tensor: torch.Tensor, numel: int, dtypes: tuple) -> None:
        if tensor.numel() != numel or tensor.dtype not in dtypes:
            full = f"{name}.{key}" if key else name
            allowed = " or ".join(_dtype_name(d) for d in dtypes)
            got = f"{_dtype_name(tensor.dtype)} with {tensor.numel()} values"
            _fail(name, f"'{full}' is {got}, expected {allowed} with {numel} for shape {shape}")

    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    nested = f"{name}.nested_absmax" in tensors
    if quant_type == "int8":
        data, quant_map = get(""), None
        if data.dtype != torch.int8 or list(data.shape) != shape:
            _fail(name, f"codes are {_dtype_name(data.dtype)} {list(data.shape)}, expected int8 {shape}")
    else:
        data, quant_map = _as_bytes(get("")).reshape(-1, 1), get("quant_map")
        check("", data, (n + 1) // 2, (torch.uint8,))
        check("quant_map", quant_map, 16, (torch.float32,))
    absmax = get("absmax")
    check("absmax", absmax, n_blocks, (torch.uint8,) if nested else (torch.float32,))
    state = QuantState(quant_type, torch.Size(shape), dtype, blocksize, data, absmax.reshape(-1), quant_map)
    if nested:
        nested_blocksize, offset = fields.get("nested_blocksize"), fields.get("nested_offset")
        if nested_blocksize not in BLOCKSIZES or not isinstance(offset, (int, float)):
            _fail(
                name,
                "has nested_absmax but its quant_state JSON lacks a valid nested_blocksize and nested_offset",
            )
        state.nested_blocksize = nested_blocksize
        state.nested_absmax = get("nested_absmax").reshape(-1)
        check("nested_absmax", state.nested_absmax, -(-n_blocks // nested_blocksize), (torch.float32,))
        state.nested_quant_map = get("nested_quant_map")
        check("nested_quant_map", state.nested_quant_map, 256, (torch.float32,))
        state.offset = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
    return state


def state_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the quantized weights in a checkpoint: the `name` of every `name.quant_state.*` key."""
    return sorted({key.rsplit(".quant_state.", 1)[0] for key in tensors if ".quant_state." in key})
