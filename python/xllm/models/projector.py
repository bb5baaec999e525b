"""Vision projectors: the `mmproj` GGUF files that turn images into a text model's embeddings.

A projector is told from a model by its metadata, never its name: llama.cpp's converter writes
`general.architecture = clip` and `clip.*` keys (Ollama's `isProjectorGGUF` checks the same).
It fits a text model when its output size (`clip.vision.projection_dim`, or the shape of its
last projection tensor in files that lack the key) is the model's embedding length; libmtmd
refuses any other, so xllm checks it when a model is made, naming both sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from xllm.errors import InvalidRequest
from xllm.models import gguf

ARCHITECTURE = "clip"
_OUTPUT_TENSORS = (
    ("mm.2.weight", 1),  # LLaVA's mlp head
    ("mm.input_projection.weight", 0),  # Gemma 3
)
"""(tensor, dimension) whose size is a projector's output size, by projector type."""


def is_projector(header: gguf.GGUF) -> bool:
    return header.architecture == ARCHITECTURE or any(
        k.startswith(f"{ARCHITECTURE}.") for k in header.metadata
    )


@dataclass(frozen=True)
class Projector:
    """What xllm needs of a projector file: its output size and its facts for `show`."""

    embedding_length: int | None
    """The size of the embeddings it makes (None: the file does not say)."""
    info: dict[str, Any]
    """Its metadata without big arrays, and its parameter count (Ollama's `projector_info`)."""
    weights: int
    """Bytes of its tensors."""
    compute: int
    """Bytes of the compute buffer libmtmd reserves for one image."""


def read(path: Path) -> Projector:
    """The projector in `path`; GGUFError (a 400) for a malformed file or one that is no
    projector. Cached while the file is unchanged."""
    st = path.stat()
    return _read(path, st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=64)
def _read(path: Path, size: int, mtime_ns: int) -> Projector:
    header = gguf.read(path)
    if not is_projector(header):
        kind = header.architecture or "no architecture"
        raise gguf.GGUFError(
            f"{path.name} is not a vision projector (its architecture is {kind!r}, not "
            f"{ARCHITECTURE!r})"
        )
    meta = header.metadata
    info: dict[str, Any] = dict(meta)
    info["general.parameter_count"] = sum(_count(t.dims) for t in header.tensors)
    return Projector(
        embedding_length=_output_size(header),
        info=info,
        weights=sum(t.nbytes for t in header.tensors),
        compute=_compute(meta),
    )


def _count(dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _output_size(header: gguf.GGUF) -> int | None:
    declared = header.metadata.get("clip.vision.projection_dim")
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    tensors = {t.name: t for t in header.tensors}
    for name, dim in _OUTPUT_TENSORS:
        t = tensors.get(name)
        if t is not None and len(t.dims) > dim:
            return t.dims[dim]
    return None


def _compute(meta: dict[str, Any]) -> int:
    """libmtmd's compute buffer for an image, with flash attention (its default): the input
    image as floats, and twice the widest per-patch activations (within 12 % of what
    llama.cpp reports for the test projectors)."""

    def key(name: str) -> int:
        value = meta.get(f"clip.vision.{name}")
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    size, patch = key("image_size"), key("patch_size")
    patches = (size // patch) ** 2 if patch else 0
    width = max(key("embedding_length"), key("feed_forward_length"))
    return 4 * (3 * size * size + 2 * patches * width)


def check_fits(projector: Projector, model_embedding: int, where: str, param: str) -> None:
    """A 400 naming both sizes when the projector's output is not the model's embedding."""
    made = projector.embedding_length
    if made is not None and model_embedding and made != model_embedding:
        raise InvalidRequest(
            f"{where}: the projector makes embeddings of size {made}, but the model's "
            f"embedding size is {model_embedding}; use the projector made for this model",
            param=param,
        )
