"""A strict reader of GGUF headers: metadata and tensor layout, checked before llama.cpp sees it.

Every size read from the file is checked against what is left of the file before it is used,
so a hostile header can neither allocate nor read beyond the file (RELIABILITY items 2-3:
huge counts, huge strings, tensors past the end, bad alignment, duplicate names). The planner
gets its numbers from here; big arrays (the vocabulary) are skipped, not materialised.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm.errors import InvalidRequest

MAGIC = b"GGUF"
MAX_DIMS = 4
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}  # fmt: skip
_STRING, _ARRAY = 8, 9
# ggml type -> (elements per block, bytes per block), from ggml.h / gguf-py's GGML_QUANT_SIZES
GGML_TYPES: dict[int, tuple[int, int]] = {
    0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
    9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
    15: (256, 292), 16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 82), 20: (256, 110),
    21: (256, 110), 22: (256, 50), 23: (256, 50), 24: (256, 136), 25: (32, 18), 26: (1, 1),
    27: (1, 2), 28: (1, 4), 29: (1, 8), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17),
}  # fmt: skip


class GGUFError(InvalidRequest):
    """The file is not a well-formed GGUF model."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dims: tuple[int, ...]
    type: int
    offset: int
    nbytes: int


@dataclass
class GGUF:
    path: Path
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[Tensor] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_int(self, key: str, default: int = 0) -> int:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if isinstance(value, list):  # per-layer values (some models vary heads per layer)
            value = max(value) if value else default
        return int(value) if isinstance(value, int | float) else default


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def fail(self, what: str) -> GGUFError:
        return GGUFError(f"{self.path.name}: malformed GGUF: {what} (at byte {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise self.fail(f"{what} runs past the end of the file")

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self.need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def value(self, vtype: int, what: str, keep_arrays: bool) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype != _ARRAY:
            raise self.fail(f"{what} has unknown type {vtype}")
        itype, count = self.scalar("<I", what), self.scalar("<Q", what)
        if itype in _SCALARS:
            size = struct.calcsize(_SCALARS[itype])
            self.need(count * size, what)
            if keep_arrays or count <= 64:
                items = list(
                    struct.unpack_from(f"<{count}{_SCALARS[itype][1]}", self.buf, self.pos)
                )
            else:
                items = []
            self.pos += count * size
            return items
        if itype == _STRING:
            self.need(count * 8, what)  # each string has at least its 8-byte length
            items = [self.string(what) for _ in range(count)]
            return items if keep_arrays or count <= 64 else []
        raise self.fail(f"{what} is an array of unsupported type {itype}")


def read(path: Path, keep_arrays: bool = False) -> GGUF:
    """Parse and check a GGUF file's header; GGUFError (a 400) names the defect."""
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            if size < 24:
                raise GGUFError(f"{path.name}: not a GGUF file (only {size} bytes)")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(_Cursor(buf, path), path, size, keep_arrays)
    except OSError as e:
        raise GGUFError(f"{path.name}: cannot read: {e.strerror}") from None


def _parse(c: _Cursor, path: Path, size: int, keep_arrays: bool) -> GGUF:
    if bytes(c.buf[:4]) != MAGIC:
        raise GGUFError(f"{path.name}: not a GGUF file (bad magic)")
    c.pos = 4
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        raise c.fail(f"unsupported version {version}")
    n_tensors, n_kv = c.scalar("<Q", "tensor count"), c.scalar("<Q", "metadata count")
    # every entry takes at least 12 bytes: counts beyond the file are lies
    if n_kv * 12 > size or n_tensors * 12 > size:
        raise c.fail(f"counts ({n_kv} keys, {n_tensors} tensors) exceed the file size")
    g = GGUF(path, version, file_size=size)
    for _ in range(n_kv):
        key = c.string("metadata key")
        if not key:
            raise c.fail("empty metadata key")
        if key in g.metadata:
            raise c.fail(f"duplicate metadata key {key!r}")
        g.metadata[key] = c.value(c.scalar("<I", key), key, keep_arrays)
    alignment = g.metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two")
    names: set[str] = set()
    infos = []
    for _ in range(n_tensors):
        name = c.string("tensor name")
        if name in names:
            raise c.fail(f"duplicate tensor {name!r}")
        names.add(name)
        n_dims = c.scalar("<I", name)
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions")
        dims = tuple(c.scalar("<Q", name) for _ in range(n_dims))
        ttype, offset = c.scalar("<I", name), c.scalar("<Q", name)
        if ttype not in GGML_TYPES:
            raise c.fail(f"tensor {name!r} has unknown type {ttype}")
        block, block_bytes = GGML_TYPES[ttype]
        elements = 1
        for d in dims:
            elements *= d
        if elements == 0 or elements >= 2**63 or dims[0] % block:
            raise c.fail(f"tensor {name!r} has invalid shape {dims}")
        if offset % alignment:
            raise c.fail(f"tensor {name!r} offset {offset} is not aligned")
        infos.append(Tensor(name, dims, ttype, offset, elements // block * block_bytes))
    g.data_offset = (c.pos + alignment - 1) // alignment * alignment
    for t in infos:
        if g.data_offset + t.offset + t.nbytes > size:
            raise c.fail(f"tensor {t.name!r} extends past the end of the file")
    g.tensors = infos
    return g
