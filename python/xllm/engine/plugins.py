"""Engine plugins: which engine serves which model, found from manifests.

Every engine, the built-in llama.cpp one included, is declared by a manifest: its name and
version, the engine ABI it was written against (`protocol.ABI_VERSION`), the model formats and
architectures it serves, its capabilities, and hooks to load a model and to estimate its
memory. Out-of-tree engines are Python packages with an entry point in the group
`xllm.engines` naming their manifest (a `Manifest`, or a mapping with the same keys for a
package that does not import xllm at import time):

    [project.entry-points."xllm.engines"]
    reverse = "xllm_reverse:MANIFEST"

At start-up each manifest is checked; a bad one is refused with a log line saying why, and the
others keep working. A model is served by the first engine (built-ins first) that declares its
format and architecture, or by the one a request names in its `engine` field.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from xllm.engine.protocol import ABI_VERSION, Capability, Engine, Observer
from xllm.errors import InvalidRequest
from xllm.models.modelfile import Modelfile

if TYPE_CHECKING:
    from xllm.engine.options import EngineOptions
    from xllm.engine.upstream import Target
    from xllm.memory.planner import Plan

log = logging.getLogger("xllm.engine")

GROUP = "xllm.engines"
BUILTIN = (
    "xllm.engine.llama:MANIFEST",
    "xllm.engine.whisper:MANIFEST",
    "xllm.engine.piper:MANIFEST",
    "xllm.engine.diffusion:MANIFEST",
    "xllm.engine.remote:MANIFEST",
)
"""The engines that come with xllm, declared like any plugin's (first match wins)."""

FORMATS: dict[str, str] = {
    "gguf": "a GGUF file (llama.cpp)",
    "safetensors": "a Hugging Face model folder: config.json and *.safetensors",
    "ctranslate2": "a CTranslate2 model folder (faster-whisper)",
    "piper": "a Piper voice: .onnx and .onnx.json",
    "diffusion": "diffusion model files (stable-diffusion.cpp)",
    "remote": "a model served by another server (an OpenAI-compatible endpoint)",
}
"""Every model format an engine may declare: the kinds of thing xllm can store and serve."""

State = Literal["idle", "loading", "loaded", "error"]


@dataclass(frozen=True)
class LoadSpec:
    """What an engine is given to load a model: everything resolved, nothing left to find."""

    name: str
    key: str
    """The instance's key: `name`, or `name#2`... for a replica."""
    path: Path
    """The model: a file, or a folder for folder formats."""
    format: str
    architecture: str
    options: EngineOptions
    modelfile: Modelfile = field(default_factory=Modelfile)
    files: tuple[Path, ...] = ()
    """Every file of the model, `path`'s first (a split GGUF's shards follow)."""
    adapters: tuple[Path, ...] = ()
    projector: Path | None = None
    """A vision model's projector (a GGUF `mmproj` file), when it has one."""
    plan: Plan | None = None
    """The memory plan the engine's estimate made, once the scheduler made room for it."""
    observer: Observer | None = None
    engine: str = ""
    """The engine that loads it (its manifest's name)."""
    remote: Target | None = None
    """A `remote` model's endpoint and its name there (`path` is then `remote:ENDPOINT/name`)."""


Load = Callable[[LoadSpec], Awaitable[Engine]]
Estimate = Callable[[LoadSpec], "Plan"]


@dataclass(frozen=True)
class Manifest:
    """An engine's declaration."""

    name: str
    version: str
    abi: int
    formats: tuple[str, ...]
    architectures: frozenset[str]
    """The architectures served, as the model's files name them (GGUF `general.architecture`,
    or config.json `architectures[0]`); "*" serves any architecture of its formats."""
    capabilities: frozenset[Capability]
    load: Load
    estimate: Estimate | None = None
    """The model's memory plan before it loads (None: its files' size)."""

    def serves(self, fmt: str, architecture: str) -> bool:
        return fmt in self.formats and (
            architecture in self.architectures or "*" in self.architectures
        )


class PluginError(Exception):
    """Why a manifest was refused."""


def check(declared: Any) -> Manifest:
    """A plugin's declaration as a checked Manifest; PluginError says what is wrong."""
    if isinstance(declared, Manifest):
        values: Mapping[str, Any] = {f.name: getattr(declared, f.name) for f in fields(Manifest)}
    elif isinstance(declared, Mapping):
        values = declared
    else:
        raise PluginError(f"its manifest is a {type(declared).__name__}, not a Manifest")
    required = [f.name for f in fields(Manifest) if f.name != "estimate"]
    missing = [k for k in required if values.get(k) in (None, "", (), [], frozenset())]
    if missing:
        raise PluginError(f"its manifest lacks {', '.join(missing)}")
    if not isinstance(values["name"], str) or not isinstance(values["version"], str):
        raise PluginError("its manifest's name and version must be strings")
    if values["abi"] != ABI_VERSION:
        raise PluginError(
            f"it is built for engine ABI {values['abi']!r}; this xllm has ABI {ABI_VERSION}"
        )
    formats = _strings(values["formats"], "formats")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise PluginError(
            f"it declares format {unknown[0]!r}, which xllm does not know "
            f"(known: {', '.join(FORMATS)})"
        )
    caps = _strings(values["capabilities"], "capabilities")
    known = {c.value for c in Capability}
    bad = [c for c in caps if c not in known]
    if bad:
        raise PluginError(f"it declares capability {bad[0]!r}, which xllm does not know")
    if not callable(values["load"]):
        raise PluginError("its manifest's load is not callable")
    estimate = values.get("estimate")
    if estimate is not None and not callable(estimate):
        raise PluginError("its manifest's estimate is not callable")
    return Manifest(
        name=values["name"],
        version=values["version"],
        abi=values["abi"],
        formats=tuple(formats),
        architectures=frozenset(_strings(values["architectures"], "architectures")),
        capabilities=frozenset(Capability(c) for c in caps),
        load=values["load"],
        estimate=estimate,
    )


def _strings(value: Any, key: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise PluginError(f"its manifest's {key} must be a list of strings")
    items = list(value)
    if not items or not all(isinstance(x, str) and x for x in items):
        raise PluginError(f"its manifest's {key} must be a non-empty list of strings")
    return items


def _resolve(ref: str) -> Any:
    """`module:attribute`, as entry points name objects."""
    module, _, attr = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class Engines:
    """The engines this server has, and the state of each for `/v0/health`."""

    def __init__(self, manifests: Iterable[Manifest] = ()) -> None:
        self.manifests: dict[str, Manifest] = {}
        self.refused: dict[str, str] = {}
        """Plugins that were not taken, by entry point name: why."""
        self.failures: dict[str, str] = {}
        """Engines whose last load failed: the error (cleared by a load that succeeds)."""
        for m in manifests:
            self.manifests[m.name] = m

    @classmethod
    def discover(cls) -> Engines:
        """The built-in engines, then every installed plugin."""
        engines = cls()
        refs = [(ref, ref) for ref in BUILTIN]
        refs += [(ep.name, ep.value) for ep in entry_points(group=GROUP)]
        for name, ref in refs:
            try:
                manifest = check(_resolve(ref))
                if manifest.name in engines.manifests:
                    raise PluginError(f"an engine named {manifest.name!r} is already registered")
            except Exception as e:  # a broken plugin must not stop the server
                reason = str(e) if isinstance(e, PluginError) else f"{type(e).__name__}: {e}"
                engines.refused[name] = reason
                log.error("engine plugin %r (%s) refused: %s", name, ref, reason)
                continue
            engines.manifests[manifest.name] = manifest
            log.info(
                "engine %s %s: formats %s", manifest.name, manifest.version,
                ", ".join(manifest.formats),
            )  # fmt: skip
        return engines

    def serving(self, fmt: str, architecture: str) -> Manifest | None:
        """The engine that serves a model of that format and architecture by default."""
        return next((m for m in self.manifests.values() if m.serves(fmt, architecture)), None)

    def for_model(
        self, name: str, fmt: str, architecture: str, engine: str | None = None
    ) -> Manifest:
        """The engine for a model; a 400 naming the architecture when no engine serves it, or
        naming the `engine` field when the one asked for does not exist or cannot serve it."""
        if engine is not None:
            chosen = self.manifests.get(engine)
            if chosen is None:
                raise InvalidRequest(
                    f"engine: no engine named {engine!r} (this server has "
                    f"{', '.join(sorted(self.manifests))})",
                    param="engine",
                )
            if not chosen.serves(fmt, architecture):
                raise InvalidRequest(
                    f"engine: engine {engine!r} does not serve model {name!r} ({fmt}, "
                    f"architecture {architecture!r})",
                    param="engine",
                )
            return chosen
        manifest = self.serving(fmt, architecture)
        if manifest is not None:
            return manifest
        raise InvalidRequest(
            f"model {name!r} has architecture {architecture!r} ({FORMATS.get(fmt, fmt)}), "
            "which no engine of this server serves",
            param="model",
        )

    def states(
        self, kinds_loaded: Iterable[str], kinds_loading: Iterable[str]
    ) -> list[dict[str, Any]]:
        """Every engine with its state: `loaded` while a model of it is loaded, `loading`,
        `error` after a failed load (until one succeeds) or for a refused plugin, else `idle`."""
        loaded, loading = set(kinds_loaded), set(kinds_loading)
        out: list[dict[str, Any]] = []
        for name, m in self.manifests.items():
            state: State = "idle"
            if name in self.failures:
                state = "error"
            if name in loading:
                state = "loading"
            if name in loaded:
                state = "loaded"
            entry: dict[str, Any] = {
                "name": name,
                "version": m.version,
                "formats": list(m.formats),
                "capabilities": sorted(m.capabilities),
                "state": state,
            }
            if state == "error":
                entry["error"] = self.failures[name]
            out.append(entry)
        for name, reason in self.refused.items():
            out.append({"name": name, "state": "error", "error": f"refused: {reason}"})
        return out
