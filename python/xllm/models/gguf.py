"""GGUF headers, read and checked by the Rust reader before llama.cpp ever opens the file.

`xllm._core.read_gguf` checks every count and length against the file before using it, so a
hostile header can neither allocate nor read beyond the file (RELIABILITY items 1-3); this module
turns its result into typed values and its ValueError into a 400 that names the defect.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm._core import read_gguf
from xllm.errors import InvalidRequest

SPLIT_COUNT = "split.count"
SPLIT_NO = "split.no"
_SPLIT_NAME = re.compile(r"^(.+)-(\d{5})-of-(\d{5})\.gguf$")
"""llama.cpp's names for the files of a split model (`llama_split_path`)."""
SUMMARY_ARRAY_LEN = 1024
"""Without `keep_arrays`, arrays longer than this (vocabularies) are checked but not returned;
per-layer values (one per block) stay."""


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
    arrays: dict[str, tuple[str, int]] = field(default_factory=dict)
    """(item type, length) of every array value, including those left out of `metadata`."""
    tensors: list[Tensor] = field(default_factory=list)
    alignment: int = 32
    data_offset: int = 0
    file_size: int = 0

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def arch_int(self, key: str, default: int = 0) -> int:
        value = self.metadata.get(f"{self.architecture}.{key}", default)
        if isinstance(value, list):  # per-layer values (some models vary heads per layer)
            value = max((v for v in value if isinstance(v, int | float)), default=default)
        if isinstance(value, bool):
            return default
        return int(value) if isinstance(value, int | float) else default


def read(path: Path, keep_arrays: bool = False) -> GGUF:
    """Parse and check a GGUF file's header; GGUFError (a 400) names the defect."""
    try:
        h = read_gguf(path, None if keep_arrays else SUMMARY_ARRAY_LEN)
    except ValueError as e:
        raise GGUFError(f"{path.name}: malformed GGUF: {e}") from None
    except OSError as e:
        raise GGUFError(f"{path.name}: cannot read: {e.strerror or e}") from None
    return GGUF(
        path=path,
        version=h["version"],
        metadata=h["metadata"],
        arrays=h["arrays"],
        tensors=[Tensor(*t) for t in h["tensors"]],
        alignment=h["alignment"],
        data_offset=h["data_offset"],
        file_size=h["file_size"],
    )


def split_count(g: GGUF) -> int:
    """Into how many files the model of `g` is split (1: not split)."""
    n = g.metadata.get(SPLIT_COUNT, 1)
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def model_files(path: Path) -> list[Path]:
    """Every file of the model whose (first) file is `path`: just it, or for a split model its
    siblings as llama.cpp names them, `<prefix>-00001-of-0000N.gguf` to `-0000N-of-0000N`."""
    g = read(path)
    n = split_count(g)
    if n == 1:
        return [path]
    m = _SPLIT_NAME.match(path.name)
    if g.metadata.get(SPLIT_NO, 0) != 0 or m is None or int(m.group(2)) != 1:
        raise GGUFError(
            f"{path.name} is part of a model split into {n} files: name its first file, "
            f"<prefix>-00001-of-{n:05d}.gguf"
        )
    files = [path.with_name(f"{m.group(1)}-{i:05d}-of-{n:05d}.gguf") for i in range(1, n + 1)]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GGUFError(f"{path.name}: the split model's {', '.join(missing)} not found")
    return files


def read_model(files: Sequence[Path], keep_arrays: bool = False) -> GGUF:
    """The header of a model in `files` (one, or every file of a split model in order): the
    first file's metadata with the tensors of all of them."""
    first = read(files[0], keep_arrays)
    if len(files) == 1 and split_count(first) == 1:
        return first
    return merge([first, *(read(f) for f in files[1:])])


def merge(shards: Sequence[GGUF]) -> GGUF:
    """One view of the files of a split model, checked to be all of them, in order."""
    first = shards[0]
    n = split_count(first)
    if n != len(shards):
        raise GGUFError(
            f"{first.path.name}: the model is split into {n} files, but {len(shards)} were given"
        )
    for i, shard in enumerate(shards):
        if shard.metadata.get(SPLIT_NO, 0) != i or split_count(shard) != n:
            raise GGUFError(f"{shard.path.name} is not file {i + 1} of {n} of the split model")
    tensors = [t for shard in shards for t in shard.tensors]
    declared = first.metadata.get("split.tensors.count")
    if isinstance(declared, int) and declared != len(tensors):
        raise GGUFError(
            f"{first.path.name}: the split model declares {declared} tensors, its files hold "
            f"{len(tensors)}"
        )
    if len({t.name for t in tensors}) != len(tensors):
        raise GGUFError(f"{first.path.name}: a tensor appears in more than one file of the split")
    return dataclasses.replace(first, tensors=tensors, file_size=sum(s.file_size for s in shards))


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
"""The size of each fixed-size GGUF value type (8 is a string, 9 an array)."""
_STRING, _ARRAY = 8, 9


def prefix_architecture(data: bytes) -> str | None:
    """`general.architecture` from the first bytes of a GGUF file (a ranged read of a file not
    here yet), or None when they are not a GGUF of version 2 or 3 or end before that key."""
    if data[:4] != b"GGUF" or len(data) < 24:
        return None
    if int.from_bytes(data[4:8], "little") not in (2, 3):
        return None
    kv_count, at = int.from_bytes(data[16:24], "little"), 24

    def take(n: int) -> bytes:
        nonlocal at
        if at + n > len(data):
            raise IndexError
        at += n
        return data[at - n : at]

    def skip(kind: int) -> None:
        if kind == _STRING:
            take(int.from_bytes(take(8), "little"))
        elif kind == _ARRAY:
            item, n = int.from_bytes(take(4), "little"), int.from_bytes(take(8), "little")
            if item in _SCALARS:
                take(_SCALARS[item] * n)
            else:
                for _ in range(n):
                    skip(item)
        elif kind in _SCALARS:
            take(_SCALARS[kind])
        else:
            raise IndexError  # not a GGUF value: stop

    try:
        for _ in range(kv_count):
            key = take(int.from_bytes(take(8), "little"))
            kind = int.from_bytes(take(4), "little")
            if key == b"general.architecture" and kind == _STRING:
                return take(int.from_bytes(take(8), "little")).decode("utf-8", "replace")
            skip(kind)
    except IndexError:
        pass
    return None
