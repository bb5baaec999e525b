"""LoRA adapters a request names (`lora`): a model's own (Modelfile ADAPTER, stored with it)
and the GGUF files of the loras folder (`<loras_dir>/<name>.gguf`, `--loras-dir`).

Each file is checked against its base model once (`adapter.check`, as `create` does): the
verdict is kept by the identity (path, size, mtime) of the adapter and of the model's files, so
a file replaced under the same name is checked again. One that does not fit is a 400 naming
`lora`; the loader never sees it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from xllm.engine.protocol import LORA_NAME
from xllm.errors import InvalidRequest
from xllm.models import adapter, gguf
from xllm.models.gguf import GGUFError

log = logging.getLogger("xllm.models")

_MAX_VERDICTS = 4096


@dataclass(frozen=True)
class Adapter:
    """An adapter a request may apply."""

    name: str
    path: Path
    size: int
    own: bool
    """One of the model's own: applied at scale 1 unless a request says otherwise."""

    @property
    def identity(self) -> tuple[str, int, int]:
        return _identity(self.path)


def own_name(path: Path) -> str:
    """The name a model's own adapter goes by: a stored one's digest, 12 hex digits (as IDs
    are shown), else its file's stem."""
    if path.name.startswith("sha256-"):
        return path.name.removeprefix("sha256-")[:12]
    return path.stem


def _identity(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_size, st.st_mtime_ns)


_verdicts: dict[tuple[tuple[str, int, int], ...], str | None] = {}


def check(found: Adapter, base_files: Sequence[Path]) -> None:
    """A 400 naming `lora` when `found` cannot be applied to the model made of `base_files`."""
    key = (found.identity, *(_identity(f) for f in base_files))
    if key not in _verdicts:
        if len(_verdicts) >= _MAX_VERDICTS:
            _verdicts.clear()
        try:
            adapter.check(gguf.read(found.path), gguf.read_model(base_files), found.name)
            _verdicts[key] = None
        except GGUFError as e:
            _verdicts[key] = e.message
        except OSError as e:
            _verdicts[key] = f"{found.name}: {e.strerror or e}"
    verdict = _verdicts[key]
    if verdict is not None:
        raise InvalidRequest(f"lora: {verdict}", param="lora")


def resolve(name: str, own: Sequence[Path], loras_dir: Path | None) -> Adapter:
    """The adapter `name` stands for: one of the model's `own`, else `<loras_dir>/<name>.gguf`;
    a 400 naming `lora` when there is none."""
    for path in own:
        if own_name(path) == name:
            return Adapter(name, path, path.stat().st_size, own=True)
    if loras_dir is not None and re.fullmatch(LORA_NAME, name):
        path = loras_dir / f"{name}.gguf"
        if path.is_file():
            return Adapter(name, path, path.stat().st_size, own=False)
    where = f" nor {loras_dir / name}.gguf" if loras_dir is not None else ""
    raise InvalidRequest(
        f"lora: no LoRA adapter is named {name!r} (not one of the model's own{where})",
        param="lora",
    )


def available(
    own: Sequence[Path], loras_dir: Path | None, base_files: Callable[[], Sequence[Path]]
) -> list[Adapter]:
    """The adapters a request to this model may name: its own, then those of the loras
    folder that fit it (`base_files` are the model's files, asked for only when there are
    some to check)."""
    out = [Adapter(own_name(p), p, p.stat().st_size, own=True) for p in own]
    if loras_dir is None or not loras_dir.is_dir():
        return out
    files: Sequence[Path] | None = None
    for path in sorted(loras_dir.glob("*.gguf")):
        if not re.fullmatch(LORA_NAME, path.stem) or not path.is_file():
            continue
        found = Adapter(path.stem, path, path.stat().st_size, own=False)
        files = files if files is not None else base_files()
        try:
            check(found, files)
        except (InvalidRequest, OSError) as e:
            log.debug("LoRA adapter %s does not fit: %s", path, e)
            continue
        out.append(found)
    return out
