"""Checks on the files of a model or adapter folder, each failure one sentence naming the file and field.

These run before anything is read into memory: a `config.json` that is not an object, a shard index
whose `weight_map` is not a map of tensor name to file, a garbled `loraforge_source.json`, and a
safetensors file whose header lies (a length past the end of the file, offsets past the end, a size
that disagrees with the tensor's shape and dtype) are reported, not met as tracebacks later.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path, PurePosixPath

from ..errors import LoraForgeError

log = logging.getLogger("loraforge")

SOURCE_FILE = "loraforge_source.json"
INDEX_FILE = "model.safetensors.index.json"
# bytes per element of each safetensors dtype
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def shown(path) -> str:
    """A path as error messages show it: a 5,000-character path would bury the sentence."""
    text = str(path)
    return text if len(text) <= 200 else f"{text[:90]}...{text[-90:]}"


def read_json_object(path: Path, what: str) -> dict:
    """A JSON file that must hold an object (`what` names it in the error)."""
    try:
        raw = json.loads(path.read_text())
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise LoraForgeError(f"{shown(path)}: not valid JSON ({e})") from None
    except OSError as e:
        raise LoraForgeError(f"{shown(path)}: cannot read ({e.strerror or e})") from None
    if not isinstance(raw, dict):
        raise LoraForgeError(f"{shown(path)}: {what} must be a JSON object, not {type(raw).__name__}")
    return raw


def shard_files(folder: Path) -> list[Path]:
    """The weight files model.safetensors.index.json names: each a file inside `folder`."""
    index = folder / INDEX_FILE
    weight_map = read_json_object(index, "the shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LoraForgeError(f"{index}: weight_map must be a non-empty object of tensor name -> file name, "
                             f"got {type(weight_map).__name__}")
    shards = set()
    for key, name in weight_map.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or name.startswith("/") or ".." in parts:
            raise LoraForgeError(f"{index}: weight_map[{key!r}] must be a file name inside the folder, got {name!r}")
        shards.add(name)
    return [folder / s for s in sorted(shards)]


def source_record(folder: Path) -> dict:
    """loraforge_source.json (what a converted or quantized folder was made from), {} if absent.

    It only names things; a garbled one must not stop the model loading, so it is reported and ignored.
    """
    path = folder / SOURCE_FILE
    if not path.exists():
        return {}
    try:
        raw = read_json_object(path, SOURCE_FILE)
    except LoraForgeError as e:
        log.warning("%s; ignoring it", e)
        return {}
    bad = [k for k in ("name", "gguf", "quantized_from", "quant_type") if k in raw and not isinstance(raw[k], str)]
    if bad:
        log.warning("%s: %s must be a string; ignoring the file", path, bad[0])
        return {}
    return raw


def safetensors_header(path: Path) -> dict:
    """The header of a safetensors file, {tensor name: {dtype, shape, data_offsets}}, checked in full.

    Checks what a reader would trip over later: the header's length and JSON, each tensor's dtype,
    shape and offsets, that the bytes each tensor needs are its shape times its dtype's size, and that
    the file holds every byte the header promises.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise LoraForgeError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            n = int.from_bytes(head, "little")
            if n > min(size - 8, MAX_HEADER):
                raise LoraForgeError(f"{path}: truncated or corrupt safetensors file (the header claims {n} bytes, "
                                     f"the file has {size - 8} after the length)")
            text = f.read(n)
    except OSError as e:
        raise LoraForgeError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise LoraForgeError(f"{path}: corrupt safetensors file (its header is not valid JSON: {e})") from None
    if not isinstance(header, dict):
        raise LoraForgeError(f"{path}: corrupt safetensors file (its header is not a JSON object)")
    header.pop("__metadata__", None)
    data = size - 8 - n
    for key, info in header.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(info, dict) or info.get("dtype") not in DTYPE_BYTES:
            raise LoraForgeError(f"{where} has no known dtype in the header")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                                  for s in shape):
            raise LoraForgeError(f"{where} has a malformed shape {shape!r} in the header")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise LoraForgeError(f"{where} has malformed data_offsets {offsets!r} in the header")
        if offsets[1] - offsets[0] != math.prod(shape) * DTYPE_BYTES[info["dtype"]]:
            raise LoraForgeError(f"{where}: shape {shape} of {info['dtype']} needs "
                                 f"{math.prod(shape) * DTYPE_BYTES[info['dtype']]} bytes, the header gives it "
                                 f"{offsets[1] - offsets[0]}")
        if offsets[1] > data:
            raise LoraForgeError(f"{path}: truncated safetensors file (tensor {key!r} ends at byte {offsets[1]} of "
                                 f"the data, the file holds {data})")
    return header
