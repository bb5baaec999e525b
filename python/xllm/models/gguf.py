"""GGUF headers, read and checked by the Rust reader before llama.cpp ever opens the file.

`xllm._core.read_gguf` checks every count and length against the file before using it, so a
hostile header can neither allocate nor read beyond the file (RELIABILITY items 1-3); this module
turns its result into typed values and its ValueError into a 400 that names the defect.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xllm._core import read_gguf
from xllm.errors import InvalidRequest

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
