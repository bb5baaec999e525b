"""The tensors of a Hugging Face model folder, read from (and written to) safetensors files
with numpy.

A safetensors file is 8 bytes of header length, a JSON header (name -> dtype, shape, byte
offsets into the data that follows) and the raw little-endian data; each tensor is a view of a
read-only memory map, so a model larger than memory converts one tensor at a time. BF16 has no
numpy type: it widens to F32 (the top 16 bits of an F32 are a BF16).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from xllm.models import safetensors
from xllm.models.safetensors import SafetensorsError

_DTYPES: dict[str, npt.DTypeLike] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?",
}  # fmt: skip


def files(folder: Path) -> list[Path]:
    """The folder's weights files in name order (a sharded model's parts in their order)."""
    found = sorted(p for p in folder.iterdir() if p.is_file() and safetensors.is_weights(p.name))
    if not found:
        raise SafetensorsError(f"{folder}: no .safetensors file")
    return found


def _tensor(data: np.memmap[tuple[int, ...], np.dtype[np.uint8]], name: str,
            info: object, base: int) -> npt.NDArray[np.generic]:  # fmt: skip
    if not isinstance(info, dict):
        raise SafetensorsError(f"tensor {name!r}: not an object in the header")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in _DTYPES:
        raise SafetensorsError(f"tensor {name!r}: dtype {dtype!r} is not supported")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SafetensorsError(f"tensor {name!r}: bad shape")
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise SafetensorsError(f"tensor {name!r}: bad data_offsets")
    start, end = base + offsets[0], base + offsets[1]
    width = np.dtype(_DTYPES[dtype]).itemsize
    if not 0 <= start <= end <= data.size or end - start != math.prod(shape) * width:
        raise SafetensorsError(f"tensor {name!r}: data_offsets do not match its shape")
    array = data[start:end].view(_DTYPES[dtype]).reshape(shape)
    if dtype == "BF16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def read(folder: Path) -> Iterator[tuple[str, npt.NDArray[np.generic]]]:
    """(name, array) of every tensor of the folder, file by file, in each file's order."""
    for path in files(folder):
        header = safetensors.read_header(path)
        data = np.memmap(path, dtype=np.uint8, mode="r")
        base = 8 + int(np.frombuffer(data[:8].tobytes(), "<u8")[0])
        for name, info in header.items():
            if name != "__metadata__":
                yield name, _tensor(data, name, info, base)


def write(path: Path, tensors: list[tuple[str, str, tuple[int, ...]]],
          data: Iterable[npt.NDArray[np.generic]]) -> None:  # fmt: skip
    """A safetensors file of `tensors` (name, dtype, shape), their data coming in that order
    from `data`, so that one tensor at a time is in memory (BF16 data as its uint16 bits)."""
    header: dict[str, object] = {}
    offset = 0
    for name, dtype, shape in tensors:
        size = math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(head)) + head)
        for (name, dtype, shape), array in zip(tensors, data, strict=True):
            array = np.ascontiguousarray(array, dtype=_DTYPES[dtype])
            if array.shape != shape:
                raise ValueError(f"tensor {name}: shape {array.shape}, expected {shape}")
            f.write(array.data)
