"""How a model is loaded, and where llama-cpp-python's libllama is."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from xllm.errors import ModelLoadError


@dataclass(frozen=True)
class EngineOptions:
    """The knobs of `xllm serve` that reach llama.cpp."""

    ctx_size: int = 4096
    parallel: int = 16
    threads: int = 0
    batch_size: int = 512
    gpu_layers: int = -1
    max_queue: int = 1000
    max_tokens: int = 0
    """Tokens one request may generate at most, whatever it asks; 0: up to the context."""
    watchdog_s: float = 120.0
    """A runner with work that makes no progress for this long is killed."""
    tensor_split: tuple[float, ...] = ()
    """Share of the offloaded layers per GPU (empty: llama.cpp's default)."""
    keep_alive_s: float = 300.0
    """How long an idle model stays loaded unless a request says otherwise."""
    chat_template: str | None = None
    """A stored model's Modelfile TEMPLATE (Jinja2), in place of the GGUF's own."""
    splits: tuple[str, ...] = ()
    """The further files of a GGUF split into several, in order (the model path is the first)."""
    adapters: tuple[str, ...] = ()
    """The model's own LoRA adapter files (Modelfile ADAPTER): applied at scale 1 unless a
    request's `lora` says otherwise."""
    loras_dir: str | None = None
    """Where further adapters a request names are found (`<name>.gguf`)."""
    projector: str | None = None
    """A vision projector (`mmproj` GGUF) loaded with libmtmd beside the model."""
    speculative: str = "none"
    """Speculation for requests that do not choose: "ngram", "draft" or "none" (SPECULATIVE)."""
    draft_model: str | None = None
    """The draft model loaded beside this one for draft-model speculation (its name)."""
    draft_path: str | None = None
    """Its GGUF file (resolved by the registry)."""
    draft_splits: tuple[str, ...] = ()
    """The further files of a draft model split into several, in order."""
    kv_dir: str | None = None
    """Where finished sequences' KV state is saved for later prompts (None: not saved); the
    engine keeps a folder of its own in it per model file and KV settings."""
    kv_max_bytes: int = 0
    """Disk the saved KV state of one model may take."""

    @classmethod
    def from_json(cls, text: str) -> EngineOptions:
        """The options as `json.dumps(asdict(options))` wrote them for a runner."""
        raw: dict[str, Any] = json.loads(text)
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        return cls(**fields)

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


def child_command(command: str) -> list[str]:
    """How xllm starts one of its internal commands (`runner`, `render`) as a child process,
    from a source install or a frozen binary alike."""
    if getattr(sys, "frozen", False):
        return [sys.executable, command]
    return [sys.executable, "-m", "xllm", command]


def libllama_path() -> Path:
    """The libllama shared library inside the installed llama-cpp-python."""
    return _library("llama")


def libmtmd_path() -> Path:
    """libmtmd (llama.cpp's multimodal library) inside the installed llama-cpp-python."""
    return _library("mtmd")


def _library(name: str) -> Path:
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("llama-cpp-python is not installed")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for file in (f"lib{name}.so", f"lib{name}.dylib", f"{name}.dll"):
        if (lib_dir / file).exists():
            return lib_dir / file
    raise ModelLoadError(f"lib{name} not found in {lib_dir}")


def llama_cpp_version() -> str:
    return version("llama_cpp_python")
