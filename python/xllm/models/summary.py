"""What `show` and `list` tell about a model file without loading it, read from its GGUF header
(a safetensors model's: xllm.models.safetensors).

Read once: for a stored blob (immutable, named by its digest) the store keeps it on disk; for
any other file it is cached in memory per (path, size, mtime).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from xllm.models import gguf
from xllm.models.metadata import FILE_TYPES, file_capabilities

VERSION = 3
"""Bumped when the fields change, so old cache files are recomputed."""


@dataclass(frozen=True)
class Summary:
    architecture: str
    parameter_count: int
    quantization: str
    context_length: int
    embedding_length: int
    block_count: int
    capabilities: list[str]
    chat_template: str | None
    license: str | None
    head_count: int | None = None
    head_count_kv: int | None = None
    model_info: dict[str, Any] = field(default_factory=dict)
    """The header's metadata without the tokenizer's big arrays (Ollama's `model_info`)."""
    format: str = "gguf"
    """`gguf`, or a folder format (`safetensors`, `ctranslate2`, `piper`: xllm.models.folders)."""
    projector_info: dict[str, Any] = field(default_factory=dict)
    """A vision model's projector's metadata (Ollama's `projector_info`); empty without one.
    Never cached with the model file's facts: the registry adds it (a projector is a layer
    of its own, shared or replaced apart from the model)."""

    def to_json(self) -> dict[str, Any]:
        return {"version": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Summary | None:
        """None for a cache entry of another version or shape (it is recomputed)."""
        if not isinstance(data, dict) or data.pop("version", None) != VERSION:
            return None
        try:
            return cls(**data)
        except TypeError:
            return None


def summarize(files: Sequence[Path]) -> Summary:
    """Read the header of the model in `files` (one, or every file of a split model);
    GGUFError, a 400, for a malformed one."""
    header = gguf.read_model(files)
    path = files[0]
    meta = header.metadata
    arch = header.architecture or "unknown"
    ftype = meta.get("general.file_type")
    params = sum(math.prod(t.dims) for t in header.tensors)
    template = meta.get("tokenizer.chat_template")
    license_ = meta.get("general.license")
    info = {k: v for k, v in meta.items() if not k.startswith("tokenizer.ggml.")}
    info["general.parameter_count"] = params
    return Summary(
        architecture=arch,
        parameter_count=params,
        quantization=FILE_TYPES.get(ftype, "unknown") if isinstance(ftype, int) else "unknown",
        context_length=header.arch_int("context_length"),
        embedding_length=header.arch_int("embedding_length"),
        block_count=header.arch_int("block_count"),
        capabilities=file_capabilities(path),
        chat_template=template if isinstance(template, str) and template else None,
        license=license_ if isinstance(license_, str) and license_ else None,
        head_count=header.arch_int("attention.head_count") or None,
        head_count_kv=header.arch_int("attention.head_count_kv") or None,
        model_info=info,
    )


def of_file(path: Path) -> Summary:
    """The summary of a model outside the store (a GGUF file, a folder of another format or a
    Piper voice's .onnx: xllm.models.folders), cached while it is unchanged."""
    if path.is_dir() or path.name.endswith(".onnx"):
        from xllm.models import folders  # it builds on this module

        return folders.summarize_path(path)
    st = path.stat()
    return _cached(path.resolve(), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=256)
def _cached(path: Path, size: int, mtime_ns: int) -> Summary:
    return summarize(gguf.model_files(path))


def params_label(n: int) -> str:
    """A parameter count as Ollama prints it: `135M`, `1.2B`."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}".replace(".0", "")
    return str(n)
