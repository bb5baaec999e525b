"""What a model is: the facts read once from its GGUF metadata."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from xllm.errors import InvalidRequest
from xllm.models import gguf

# llama.cpp's `llama_ftype` numbers, as GGUF stores them in `general.file_type`.
FILE_TYPES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4",
}  # fmt: skip


class MetadataSource(Protocol):
    """What the engine tells about a loaded model."""

    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_params: int
    model_size: int
    n_vocab: int
    fim_tokens: tuple[int, int, int] | None
    """(prefix, suffix, middle) fill-in-the-middle tokens, when the vocabulary has them."""

    def metadata(self) -> dict[str, str]: ...

    def token_piece(self, token: int) -> bytes: ...


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _piece(src: MetadataSource, token: str | None) -> str:
    """Text of a special token (for templates' bos_token/eos_token)."""
    tid = _int(token)
    if tid is None or not 0 <= tid < src.n_vocab:
        return ""
    return src.token_piece(tid).decode("utf-8", "replace")


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    architecture: str
    context_length: int
    embedding_length: int
    block_count: int
    parameter_count: int
    size: int
    quantization: str
    chat_template: str | None
    n_vocab: int = 0
    bos_text: str = ""
    eos_text: str = ""
    head_count: int | None = None
    head_count_kv: int | None = None
    license: str | None = None
    fim_tokens: tuple[int, int, int] | None = None
    image_marker: str | None = None
    """A loaded vision model's text for an image in a prompt (None: the model takes none)."""
    draft: str | None = None
    """The draft model loaded beside it for speculation (its name), and its weights' size."""
    draft_size: int = 0
    metadata: dict[str, str] = field(default_factory=dict, repr=False)
    format: str = "gguf"
    """The model's file format (xllm.engine.plugins.FORMATS)."""

    @classmethod
    def from_engine(cls, name: str, path: Path, src: MetadataSource) -> ModelInfo:
        meta = src.metadata()
        arch = meta.get("general.architecture", "unknown")
        ftype = _int(meta.get("general.file_type"))
        return cls(
            name=name,
            path=path,
            architecture=arch,
            context_length=src.n_ctx_train,
            embedding_length=src.n_embd,
            block_count=src.n_layer,
            parameter_count=src.n_params,
            size=src.model_size,
            quantization=FILE_TYPES.get(ftype, "unknown") if ftype is not None else "unknown",
            chat_template=meta.get("tokenizer.chat_template") or None,
            n_vocab=src.n_vocab,
            bos_text=_piece(src, meta.get("tokenizer.ggml.bos_token_id")),
            eos_text=_piece(src, meta.get("tokenizer.ggml.eos_token_id")),
            head_count=_int(meta.get(f"{arch}.attention.head_count")),
            head_count_kv=_int(meta.get(f"{arch}.attention.head_count_kv")),
            license=meta.get("general.license"),
            fim_tokens=src.fim_tokens,
            metadata=meta,
        )

    @property
    def capabilities(self) -> list[str]:
        caps = capabilities(self.metadata, infill=self.fim_tokens is not None)
        if self.image_marker is not None and "vision" not in caps:
            caps.append("vision")
        return caps

    def check_tokens(self, tokens: Sequence[int], param: str) -> list[int]:
        """Token ids a client gave, checked against the vocabulary (a 400 naming `param`)."""
        bad = next((t for t in tokens if not 0 <= t < self.n_vocab), None)
        if bad is not None:
            raise InvalidRequest(
                f"{param}: token id {bad} is outside the vocabulary (0..{self.n_vocab})",
                param=param,
            )
        return list(tokens)


EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert", "nomic-bert-moe", "jina-bert-v2"})
FIM_PREFIX_TEXTS = frozenset({"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<PRE>"})
"""Vocabulary entries llama.cpp recognises as the fill-in-the-middle prefix token."""
_THINKING_MARKS = ("<think>", "enable_thinking", "reasoning_content")


def capabilities(metadata: Mapping[str, Any], *, infill: bool) -> list[str]:
    """Ollama's capability names for a model, plus "chat" when it carries a chat template.

    From GGUF metadata and the template: a pooling type means an embedding model; a template
    that mentions tools means the model was trained to call them; `infill` (the vocabulary has
    fill-in-the-middle tokens) means `insert`.
    """
    arch = str(metadata.get("general.architecture", ""))
    if arch in EMBEDDING_ARCHITECTURES or f"{arch}.pooling_type" in metadata:
        return ["embedding"]
    template = str(metadata.get("tokenizer.chat_template") or "")
    caps = ["completion"]
    if template:
        caps.append("chat")
    if "tools" in template:
        caps.append("tools")
    if infill:
        caps.append("insert")
    if "clip.has_vision_encoder" in metadata or f"{arch}.vision.block_count" in metadata:
        caps.append("vision")
    if any(mark in template for mark in _THINKING_MARKS):
        caps.append("thinking")
    return caps


def file_capabilities(path: Path) -> list[str]:
    """The capabilities of a model file not loaded yet, from its header (cached per version)."""
    st = path.stat()
    return list(_file_capabilities(path, st.st_size, st.st_mtime_ns))


@lru_cache(maxsize=256)
def _file_capabilities(path: Path, size: int, mtime_ns: int) -> tuple[str, ...]:
    header = gguf.read(path, keep_arrays=True)
    tokens = header.metadata.get("tokenizer.ggml.tokens") or []
    return tuple(capabilities(header.metadata, infill=not FIM_PREFIX_TEXTS.isdisjoint(tokens)))
