"""Loaded models: which names resolve to which files, loading on demand, one load per model.

A model may run as several replicas (`models.replicas`), each its own runner, taking requests
in turn; `loaded()` is keyed by instance: the name for the first, `name#2`, `name#3`... after.
A watch task unloads idle models past their keep_alive and, while RAM or any GPU's memory is
fuller than `memory.high_watermark`, the least valuable idle one each second.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines, LoadSpec, Manifest
from xllm.engine.protocol import Engine, Observer
from xllm.errors import (
    CorruptModel,
    InsufficientMemory,
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
)
from xllm.memory import planner, probe
from xllm.models import gguf, gotemplate, names, summary
from xllm.models.modelfile import Modelfile, is_go_template
from xllm.models.store import ADAPTER, GGUF, SAFETENSORS_FORMAT, Store, StoredModel

log = logging.getLogger("xllm.models")

REAP_INTERVAL_S = 0.5
PRESSURE_INTERVAL_S = 1.0
HIGH_WATERMARK = 0.9
"""Above this fraction of RAM or of a GPU's memory in use, idle models are unloaded."""
_RANK = {"low": 0, "normal": 1, "high": 2}
GRACE_S = 1.0
"""A model handed to a request this recently is neither reaped nor evicted (it is about to run)."""


@dataclass(frozen=True)
class Resolved:
    name: str
    path: Path
    stored: StoredModel | None = None
    """Set for a model from the store: its manifest and Modelfile."""


@dataclass(frozen=True)
class LoadState:
    name: str
    started: float


class ModelRegistry:
    """Resolves model names and keeps the loaded ones."""

    def __init__(
        self,
        options: EngineOptions,
        observer: Observer | None = None,
        budget: int | None = None,
        priorities: dict[str, str] | None = None,
        store: Store | None = None,
        replicas: dict[str, int] | None = None,
        high_watermark: float = HIGH_WATERMARK,
        engines: Engines | None = None,
    ) -> None:
        self.options = options
        self.engines = engines if engines is not None else Engines.discover()
        """The engines that serve models, by format and architecture (engine/plugins.py)."""
        self.observer = observer
        self.budget = budget
        self.high_watermark = high_watermark
        self.store = store
        """Pulled and created models; resolved after command-line paths, before bundled ones."""
        self._paths: dict[str, Path] = {}
        self.priorities = {self.key(k): v for k, v in (priorities or {}).items()}
        self.replicas = {self.key(k): v for k, v in (replicas or {}).items()}
        self._turns: dict[str, itertools.count[int]] = {}
        self._loaded: dict[str, Engine] = {}
        """Keyed by instance: the model's name, then `name#2`... for its further replicas."""
        self._loading: dict[str, asyncio.Task[Engine]] = {}
        self._load_started: dict[str, float] = {}
        self._loading_kind: dict[str, str] = {}
        self._reaper: asyncio.Task[None] | None = None

    def add_path(self, path: Path) -> str:
        """Make a model file or folder (given on the command line) servable; returns its
        name."""
        name = names.name_for_path(path)
        self._paths[name] = path.resolve()
        return name

    def stored(self, name: str) -> StoredModel | None:
        """The store's model of that name (an invalid name is a 400); None for a manifest that
        cannot be read, which `find` reports."""
        return self.store.get(names.parse_name(name)) if self.store is not None else None

    def key(self, name: str) -> str:
        """The name a model is known by: `model` -> `model:latest`; aliases of bundled models
        apply unless a model of that very name is served from a path or the store."""
        key = names.parse_name(name).display
        alias = names.ALIASES.get(key)
        if alias is None or key in self._paths or self.stored(key) is not None:
            return key
        return alias

    def find(self, name: str) -> Resolved:
        """Where a requested name's model is: a command-line path, the store, or a bundled
        model, in that order; ModelNotFound otherwise."""
        key = self.key(name)
        path = self._paths.get(key)
        if path is not None:
            return Resolved(key, path)
        stored = self.store.find(names.parse_name(key)) if self.store is not None else None
        if stored is not None:
            return Resolved(key, stored.model_path, stored)
        path = names.bundled_path(key)
        if path is None:
            raise ModelNotFound(f"model {name!r} not found", param="model")
        return Resolved(key, path)

    def facts(self, found: Resolved) -> summary.Summary:
        """What `show`, `list` and `/v1/models` tell of a model not loaded: a stored one's
        cached facts (whatever its format), a file's from its GGUF header."""
        if found.stored is not None and self.store is not None:
            with self.reading(found):
                return self.store.summary_of(found.stored.manifest)
        return summary.of_file(found.path)

    @contextlib.contextmanager
    def reading(self, found: Resolved) -> Iterator[None]:
        """Around a read of a model's files (in a worker thread): a stored model's file that
        fails to read and no longer matches its digest is the server's 500 (CorruptModel), not
        the client's 400 of a malformed file."""
        try:
            yield
        except (InvalidRequest, OSError):
            corrupt = self.corruption(found.stored) if found.stored is not None else None
            if corrupt is not None:
                raise corrupt from None
            raise

    def resolve(self, name: str) -> tuple[str, Path]:
        """(canonical name, file) for a requested name, or ModelNotFound."""
        found = self.find(name)
        return found.name, found.path

    def available(self) -> list[str]:
        """Every name a request may use right now."""
        bundled = [n for n in names.BUNDLED if names.bundled_path(n) is not None]
        stored = [m.name.display for m in self.store.list()] if self.store is not None else []
        loaded = {m.name for m in self._loaded.values()}
        return sorted(set(self._paths) | loaded | set(bundled) | set(stored))

    @property
    def loaded(self) -> dict[str, Engine]:
        return dict(self._loaded)

    def loading(self) -> list[LoadState]:
        return [LoadState(n, self._load_started[n]) for n in self._loading]

    def loading_kinds(self) -> list[str]:
        """The engines loading a model now."""
        return list(self._loading_kind.values())

    def engine_for(self, found: Resolved, engine: str | None = None) -> tuple[Manifest, str]:
        """(the engine for a model, its architecture); a 400 before anything loads when no
        engine serves the model (naming its architecture) or the one asked for cannot."""
        with self.reading(found):
            facts = self.facts(found)
        try:
            return self.engines.for_model(
                found.name, facts.format, facts.architecture, engine
            ), facts.architecture
        except InvalidRequest:
            if facts.format == SAFETENSORS_FORMAT and found.stored is not None and engine is None:
                raise self._unservable(found.stored, facts.architecture) from None
            raise

    async def get(
        self,
        name: str,
        keep_alive: float | None = None,
        ctx_size: int | None = None,
        engine: str | None = None,
    ) -> Engine:
        """The loaded model for `name`, loading it first if needed (concurrent callers share it).

        `keep_alive` (seconds, negative = forever) replaces how long it stays loaded once idle.
        `ctx_size` (Ollama's `num_ctx`) reloads the model with that context per sequence if it
        was loaded with another, once its running requests are done, as Ollama does; requests
        that do not ask for a context take the model as it is. `engine` (a request's) forces
        the engine kind, reloading a model loaded by another the same way.
        """
        found = self.find(name)
        key = self._next_instance(found.name)
        model = self._loaded.get(key)
        if engine is not None:
            self.engine_for(found, engine)  # a 400 for an engine that cannot serve it
        other_engine = model is not None and engine is not None and model.kind != engine
        other_ctx = model is not None and ctx_size is not None and not _has_context(model, ctx_size)
        if model is not None and (other_ctx or other_engine):
            log.info("reloading %s (context %s, engine %s)", key, ctx_size, engine or model.kind)
            while True:  # `busy` comes from the runner's reports: polled, not awaited
                if not model.busy:
                    break
                await asyncio.sleep(0.05)
            if self._loaded.get(key) is model:
                await self._unload_instance(key)
            model = None
        if model is None:
            model = await self._get_loading(found, key, ctx_size, engine)
        model.last_active = time.monotonic()
        if keep_alive is not None:
            for m in self.instances(found.name):
                m.keep_alive = keep_alive
        self._ensure_watch()
        return model

    async def preload(self, name: str) -> None:
        """Load a model and all its replicas."""
        found = self.find(name)
        for i in range(self.replicas.get(found.name, 1)):
            key = instance_key(found.name, i)
            if key not in self._loaded:
                await self._get_loading(found, key)
        self._ensure_watch()

    def _ensure_watch(self) -> None:
        """The watch runs while models are loaded (it ends when none are left)."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._watch())

    def _next_instance(self, name: str) -> str:
        """Round-robin over a model's replicas (just `name` for a model with one)."""
        n = self.replicas.get(name, 1)
        if n <= 1:
            return name
        turn = self._turns.setdefault(name, itertools.count())
        return instance_key(name, next(turn) % n)

    def instances(self, name: str) -> list[Engine]:
        """Every loaded replica of model `name`."""
        return [m for m in self._loaded.values() if m.name == name]

    async def _get_loading(
        self, found: Resolved, key: str, ctx_size: int | None = None, engine: str | None = None
    ) -> Engine:
        task = self._loading.get(key)
        if task is None:
            manifest, arch = await asyncio.to_thread(self.engine_for, found, engine)
            task = asyncio.create_task(self._load(found, key, manifest, arch, ctx_size))
            self._loading[key] = task
            self._load_started[key] = time.time()
            self._loading_kind[key] = manifest.name
        # shield: one impatient client leaving must not cancel a load others wait for
        return await asyncio.shield(task)

    async def _load(
        self,
        found: Resolved,
        key: str,
        manifest: Manifest,
        architecture: str,
        ctx_size: int | None = None,
    ) -> Engine:
        name, path = found.name, found.path
        log.info("loading model %s from %s with engine %s", key, path, manifest.name)
        t0 = time.perf_counter()
        stored = found.stored
        modelfile = stored.modelfile if stored is not None else Modelfile()
        try:
            fmt = (
                stored.format if stored is not None else ("safetensors" if path.is_dir() else GGUF)
            )
            files: tuple[Path, ...] = (path,)
            if stored is not None and fmt == GGUF:
                files = tuple(stored.files)
            elif fmt == GGUF:
                files = tuple(await asyncio.to_thread(gguf.model_files, path))
            o = _with_modelfile(self.options, name, modelfile)
            if ctx_size is not None:  # the request's, over the Modelfile's and the server's
                o = dataclasses.replace(o, ctx_size=ctx_size)
            spec = LoadSpec(
                name=name, key=key, path=path, format=fmt, architecture=architecture,
                options=o, modelfile=modelfile, files=files,
                adapters=tuple(stored.adapter_paths) if stored is not None else (),
                observer=self.observer,
            )  # fmt: skip
            if manifest.estimate is not None:
                plan = await asyncio.to_thread(manifest.estimate, spec)
                await self._make_room(key, plan)
                log.info("plan for %s: %s, %d GPU layers", key, plan.describe(), plan.gpu_layers)
                spec = dataclasses.replace(spec, plan=plan)
            model = await self._start(manifest, spec)
        except (gguf.GGUFError, ModelLoadError, OSError) as e:
            self.engines.failures[manifest.name] = getattr(e, "message", str(e))
            if found.stored is not None:
                corrupt = await asyncio.to_thread(self.corruption, found.stored)
                if corrupt is not None:
                    raise corrupt from None
            raise
        finally:
            self._loading.pop(key, None)
            self._load_started.pop(key, None)
            self._loading_kind.pop(key, None)
        self.engines.failures.pop(manifest.name, None)
        model.key = key
        model.on_exit = self._on_exit
        self._loaded[key] = model
        elapsed = time.perf_counter() - t0
        if self.observer is not None:
            self.observer.observe_load(name, elapsed)
        log.info("loaded model %s in %.2f s", key, elapsed)
        return model

    def _unservable(self, stored: StoredModel, architecture: str) -> InvalidRequest:
        """The 400 for a stored Hugging Face model no engine serves, with the command that
        converts it to a GGUF llama.cpp serves: refused before anything loads."""
        name = stored.name.display
        return InvalidRequest(
            f"model {name!r} is in safetensors format ({architecture}), which no engine of this "
            "server serves; llama.cpp serves GGUF models: convert it once with "
            f"`echo 'FROM {name}' > Modelfile && xllm create "
            f"{stored.name.model.lower()}-gguf -f Modelfile` (or to a file: `xllm convert {name} "
            f"{stored.name.model.lower()}.gguf`), then use that model",
            param="model",
        )

    async def _start(self, manifest: Manifest, spec: LoadSpec) -> Engine:
        """Load with the engine; after an out-of-memory failure with layers on a GPU, once more
        with half as many (as Ollama does) before giving up."""
        try:
            return await manifest.load(spec)
        except ModelLoadError as e:
            o = spec.options
            gpu_layers = (
                spec.plan.gpu_layers if spec.plan is not None and o.gpu_layers < 0 else o.gpu_layers
            )
            if gpu_layers <= 0 or not is_out_of_memory(f"{e.message}\n{e.detail}"):
                raise
            fewer = gpu_layers // 2
            log.warning(
                "loading %s with %d GPU layers ran out of memory; retrying with %d: %s",
                spec.name, gpu_layers, fewer, e.message,
            )  # fmt: skip
            return await manifest.load(
                dataclasses.replace(spec, options=dataclasses.replace(o, gpu_layers=fewer))
            )

    def corruption(self, stored: StoredModel) -> CorruptModel | None:
        """After a stored model's file failed to read or load: the error to give instead when
        a file is no longer what was downloaded (the server's disk, not the request, is at
        fault), or None. Reads every file in full."""
        if self.store is None:
            return None
        layers = [stored.model_digest, *stored.shard_digests]
        layers += [x.digest for x in stored.manifest.all(ADAPTER)]
        digest = self.store.verify(layers)
        if digest is None:
            return None
        path = self.store.blob_path(digest)
        state = "no longer matches its digest" if path.exists() else "is missing; its digest is"
        name = stored.name.display
        return CorruptModel(
            f"model {name!r} is corrupt on disk: its file {path} {state} {digest}; remove it "
            f"with `xllm rm {name}` and download it again with `xllm pull {name}`"
        )

    def _available(self) -> int:
        """RAM a new model may use: the budget minus loaded models' plans, or what is free."""
        if self.budget is not None:
            return self.budget - sum(m.plan.ram for m in self._loaded.values() if m.plan)
        return int(probe.ram()[1] * (1 - planner.SAFETY))

    def _least_valuable(self, idle: list[Engine]) -> Engine:
        """Lowest priority first, then least recently used."""
        rank = self.priorities
        return min(idle, key=lambda m: (_RANK[rank.get(m.name, "normal")], m.last_active))

    async def _make_room(self, key: str, plan: planner.Plan) -> None:
        """Unload idle models (lowest priority, then least recently used) until `plan` fits."""
        deadline = time.monotonic() + 10
        while plan.ram > self._available():
            idle = [m for m in self._loaded.values() if not m.busy]
            if not idle:
                busy = ", ".join(self._loaded) or "none"
                limit = f"budget {self.budget / planner.MiB:.0f} MiB" if self.budget else "free RAM"
                raise InsufficientMemory(
                    f"not enough memory to load {key}: it needs {plan.describe()}; "
                    f"{max(self._available(), 0) / planner.MiB:.0f} MiB left of the {limit}; "
                    f"models in use: {busy}"
                )
            victim = self._least_valuable(idle)
            if time.monotonic() - victim.last_active < GRACE_S and time.monotonic() < deadline:
                await asyncio.sleep(0.1)  # just handed to a request: let it start first
                continue
            log.info("unloading %s to make room for %s", victim.key, key)
            await self._unload_instance(victim.key)

    async def _watch(self) -> None:
        """Unload models idle past their keep_alive; above the high watermark of RAM or GPU
        memory, unload the least valuable idle model (one a second, so memory can settle)."""
        last_pressure = 0.0
        while self._loaded or self._loading:
            await asyncio.sleep(REAP_INTERVAL_S)
            now = time.monotonic()
            for key, model in list(self._loaded.items()):
                idle = now - model.last_active
                # the grace keeps a model that a handler just got from vanishing before use
                if (
                    not model.busy
                    and model.keep_alive >= 0
                    and idle >= max(model.keep_alive, GRACE_S)
                ):
                    log.info("unloading %s: idle for %.0f s", key, idle)
                    await self._unload_instance(key)
            if now - last_pressure >= PRESSURE_INTERVAL_S:
                last_pressure = now
                await self._relieve_pressure(now)

    async def _relieve_pressure(self, now: float) -> None:
        used, where = await asyncio.to_thread(memory_pressure)
        if used <= self.high_watermark:
            return
        idle = [m for m in self._loaded.values() if not m.busy and now - m.last_active >= GRACE_S]
        if not idle:
            return
        victim = self._least_valuable(idle)
        log.warning(
            "%s is %.0f%% full (above %.0f%%): unloading idle model %s",
            where, used * 100, self.high_watermark * 100, victim.key,
        )  # fmt: skip
        await self._unload_instance(victim.key)

    def _on_exit(self, model: Engine) -> None:
        """A runner ended (crash, kill, unload): the next request loads the model afresh."""
        if self._loaded.get(model.key) is model:
            del self._loaded[model.key]

    async def unload(self, name: str) -> bool:
        """Stop a loaded model's runners (every replica); False if it was not loaded."""
        key = self.key(name)
        found = [k for k, m in self._loaded.items() if m.name == key]
        for k in found:
            await self._unload_instance(k)
        return bool(found)

    async def _unload_instance(self, key: str) -> None:
        model = self._loaded.pop(key, None)
        if model is not None:
            await model.close()

    def abort(self, reason: str) -> None:
        """End every generation of every loaded model with a 503 `reason` (shutting down)."""
        for model in self._loaded.values():
            model.abort(reason)

    async def close(self) -> None:
        if self._reaper is not None:
            self._reaper.cancel()
        for task in list(self._loading.values()):
            task.cancel()
        models, self._loaded = list(self._loaded.values()), {}
        for m in models:
            await m.close()


def _has_context(model: Engine, ctx_size: int) -> bool:
    """Whether `model` was loaded with the context a request asks for (as capped by its
    training context, which a reload could not exceed either)."""
    return model.ctx_size == min(ctx_size, model.info.context_length or ctx_size)


def instance_key(name: str, index: int) -> str:
    """Replica `index` (from 0) of model `name`: `name`, `name#2`, `name#3`..."""
    return name if index == 0 else f"{name}#{index + 1}"


_OOM = ("out of memory", "outofmemory", "outofdevicememory", "failed to allocate", "cudamalloc")


def is_out_of_memory(message: str) -> bool:
    """Whether a failed load's message (llama.cpp's log lines included) is an allocation
    failure, which fewer GPU layers may avoid."""
    text = message.lower()
    return any(words in text for words in _OOM)


def memory_pressure() -> tuple[float, str]:
    """The fullest of RAM and each GPU's memory: (fraction in use, which one)."""
    total, free = probe.ram()
    worst = (1 - free / total if total else 0.0, "RAM")
    for g in probe.gpus():
        if g.total_bytes:
            worst = max(worst, (1 - g.free_bytes / g.total_bytes, f"GPU {g.index} memory"))
    return worst


def _with_modelfile(options: EngineOptions, name: str, modelfile: Modelfile) -> EngineOptions:
    """A stored model's Modelfile at load: `num_ctx` sizes its context, its TEMPLATE (Jinja2,
    or Ollama's Go syntax translated) replaces the GGUF's chat template (the rest applies per
    request, in the serving layer)."""
    num_ctx = modelfile.parameters.get("num_ctx")
    if isinstance(num_ctx, int) and num_ctx > 0:
        options = dataclasses.replace(options, ctx_size=num_ctx)
    template = modelfile.template
    if template and is_go_template(template):
        try:
            template = gotemplate.to_jinja(template)
        except gotemplate.GoTemplateError as e:
            log.warning("model %s: %s; the model's own chat template is used", name, e.message)
            template = None
    if template:
        options = dataclasses.replace(options, chat_template=template)
    return options
