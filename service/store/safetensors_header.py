"""Reading a safetensors header (8-byte length + JSON) without loading any tensor."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from service.errors import AdapterInvalid

MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_TENSORS = 100_000


@dataclass(frozen=True)
class TensorSpec:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path, name: str, max_tensors: int = MAX_TENSORS) -> dict[str, TensorSpec]:
    """Tensor names to dtype and shape; refuses malformed, oversized or inconsistent headers."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        prefix = handle.read(8)
        if len(prefix) != 8:
            raise AdapterInvalid(f"{name}: {path.name} is not a safetensors file (too short)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(MAX_HEADER_BYTES, size - 8):
            raise AdapterInvalid(f"{name}: {path.name} is not a safetensors file (bad header length)")
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as error:
        raise AdapterInvalid(f"{name}: {path.name} has a malformed header: {error}") from error
    if not isinstance(header, dict):
        raise AdapterInvalid(f"{name}: {path.name} has a malformed header")
    header.pop("__metadata__", None)
    if len(header) > max_tensors:
        raise AdapterInvalid(f"{name}: {path.name} holds {len(header)} tensors; the limit is {max_tensors}")
    tensors: dict[str, TensorSpec] = {}
    data_len = size - 8 - header_len
    for key, entry in header.items():
        try:
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
            dtype = str(entry["dtype"])
        except (KeyError, TypeError, ValueError) as error:
            raise AdapterInvalid(f"{name}: {path.name} has a malformed entry for {key!r}") from error
        if not 0 <= start <= end <= data_len or any(d < 0 for d in shape):
            raise AdapterInvalid(f"{name}: {path.name} entry {key!r} points outside the file")
        tensors[key] = TensorSpec(dtype=dtype, shape=shape)
    return tensors
