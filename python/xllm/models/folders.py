"""Models made of several named files (every format but GGUF): which names belong to one,
which of them are its weights, when the set is whole, and its facts.

    safetensors   a Hugging Face model folder: config.json, *.safetensors, tokenizer files
    ctranslate2   a Whisper model in CTranslate2 form: model.bin, config.json, tokenizer...
    piper         a Piper voice: <voice>.onnx and <voice>.onnx.json
    diffusion     a diffusion model's parts: diffusion_model.gguf, llm.gguf, vae.safetensors...

The store keeps such a model as one blob per file and a config blob naming them
(`{"model_format": ..., "files": {name: digest}}`); its weights files have the format's own
media type (how a manifest says its format), every other file `MODEL_FILE`. Pulls from the Hub,
uploads to `/api/create` and models given by path all go through the same rules.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from xllm.errors import InvalidRequest, ModelNotFound
from xllm.models import diffusion, safetensors, speech
from xllm.models.summary import Summary

MODEL_FILE = "application/vnd.xllm.model.file"
"""A file of a folder model that is not its weights (config.json, the tokenizer's...)."""
SAFETENSORS = "application/vnd.xllm.safetensors"
CTRANSLATE2 = "application/vnd.xllm.ctranslate2"
PIPER = "application/vnd.xllm.piper"
DIFFUSION = "application/vnd.xllm.diffusion"


@dataclass(frozen=True)
class FolderFormat:
    name: str
    weights: str
    """The media type of its weights files."""
    is_file: Callable[[str], bool]
    """A name a model of this format may hold: a fixed shape, so none leaves the folder."""
    is_weights: Callable[[str], bool]
    complete: Callable[[Collection[str]], bool]
    """Whether the names make a whole model."""
    summarize: Callable[[Mapping[str, Path]], Summary]
    """Its facts from name -> file; a 400 (InvalidRequest) for files that are not right."""


FORMATS: dict[str, FolderFormat] = {
    f.name: f
    for f in (
        FolderFormat("safetensors", SAFETENSORS, safetensors.is_model_file,
                     safetensors.is_weights, lambda n: "config.json" in n,
                     safetensors.summarize),
        FolderFormat("ctranslate2", CTRANSLATE2, speech.is_whisper_file,
                     lambda n: n == "model.bin", lambda n: speech.whisper_complete(set(n)),
                     speech.summarize_whisper),
        FolderFormat("piper", PIPER, speech.is_voice_file, lambda n: n.endswith(".onnx"),
                     lambda n: speech.voice_complete(set(n)), speech.summarize_voice),
        FolderFormat("diffusion", DIFFUSION, diffusion.is_file, diffusion.is_file,
                     diffusion.complete, diffusion.summarize),
    )
}  # fmt: skip
"""Every folder format, by name (xllm.engine.plugins.FORMATS names them too)."""


def by_media(media_types: Iterable[str]) -> FolderFormat | None:
    """The format whose weights media type is among a manifest's layers."""
    media = set(media_types)
    return next((f for f in FORMATS.values() if f.weights in media), None)


def detect(names: Collection[str]) -> FolderFormat | None:
    """The format a set of top-level file names is a model of (weights present), or None."""
    if any(n.endswith(".onnx") and speech.is_voice_file(n) and f"{n}.json" in names for n in names):
        return FORMATS["piper"]
    if "model.bin" in names:
        return FORMATS["ctranslate2"]
    if diffusion.looks_like(names):
        return FORMATS["diffusion"]
    if any(safetensors.is_weights(n) for n in names):
        return FORMATS["safetensors"]
    return None


def select(fmt: FolderFormat, repo_files: Collection[str], tag: str, repo: str) -> dict[str, str]:
    """The files of a Hub repo that make the model, as name in the model -> path in the repo.

    A safetensors or Whisper model is the repo's top level (no tags: `latest` only); a repo of
    Piper voices may hold many, anywhere in its tree (rhasspy/piper-voices): the tag names one
    by its file name (`en_US-joe-medium`), `latest` takes the only one.
    """
    if fmt.name != "piper":
        if tag != "latest":
            raise ModelNotFound(
                f"{repo} has no GGUF files on the Hub (it is a {fmt.name} model, which has no "
                f"quant tags: pull hf.co/{repo})",
                param="model",
            )
        return {f: f for f in repo_files if fmt.is_file(f)}
    voices = {
        f.rsplit("/", 1)[-1].removesuffix(".onnx"): f
        for f in repo_files
        if f.endswith(".onnx") and f"{f}.json" in repo_files and fmt.is_file(f.rsplit("/", 1)[-1])
    }
    if tag == "latest" and len(voices) == 1:
        chosen = next(iter(voices))
    else:
        chosen = next((v for v in voices if v.lower() == tag.lower()), "")
    if not chosen:
        listed = ", ".join(sorted(voices)[:20]) + (", ..." if len(voices) > 20 else "")
        raise ModelNotFound(
            f"{repo} holds {len(voices)} Piper voices; name one as the tag "
            f"(hf.co/{repo}:<voice>): {listed}",
            param="model",
        )
    path = voices[chosen]
    return {f"{chosen}.onnx": path, f"{chosen}.onnx.json": f"{path}.json"}


def local_files(path: Path) -> tuple[FolderFormat, dict[str, Path]] | None:
    """A model given by path that is not a GGUF: a folder (safetensors, Whisper, a voice) or
    a voice's `.onnx` file (its `.onnx.json` beside it); None for anything else."""
    if path.is_dir():
        names = {p.name: p for p in path.iterdir() if p.is_file()}
        fmt = detect(names)
        if fmt is None:
            return None
        return fmt, {n: p for n, p in names.items() if fmt.is_file(n)}
    if path.name.endswith(".onnx"):
        return FORMATS["piper"], {path.name: path, f"{path.name}.json": Path(f"{path}.json")}
    return None


def size(path: Path) -> int:
    """The bytes of a model given by path: a folder model's files, a voice's two, or the file
    (a diffusion model's parts, linked from elsewhere, count as the files they lead to)."""
    local = local_files(path)
    files = list(local[1].values()) if local is not None else [path]
    return sum(p.stat().st_size for p in files)


def summarize_path(path: Path) -> Summary:
    """The facts of a folder model given by path (cached while its files are unchanged)."""
    found = local_files(path)
    if found is None:
        raise InvalidRequest(f"{path} is not a model folder xllm knows", param="model")
    fmt, files = found
    stamp = []
    for name, p in sorted(files.items()):
        try:
            st = p.stat()
        except OSError:
            raise InvalidRequest(f"{path}: {name} is missing", param="model") from None
        stamp.append((name, str(p), st.st_size, st.st_mtime_ns))
    return _summarize(fmt.name, tuple(stamp))


@lru_cache(maxsize=64)
def _summarize(fmt: str, stamp: tuple[tuple[str, str, int, int], ...]) -> Summary:
    return FORMATS[fmt].summarize({name: Path(p) for name, p, _, _ in stamp})
