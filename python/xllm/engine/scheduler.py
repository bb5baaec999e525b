"""The scheduler: which engines are loaded, loading on demand, keep-alive, replicas, eviction.

A model may run as several replicas (`models.replicas`), each its own engine, taking requests
in turn; `loaded` is keyed by instance: the name for the first, `name#2`, `name#3`... after.
A watch task unloads idle models past their keep_alive and, while RAM or any GPU's memory is
fuller than the high watermark, the least valuable idle one each second.

Everything from outside comes in as a parameter, so tests drive it with fakes and no process:
`prepare` (what a load needs: engine, files, options, memory plan), `load` (the engine
factory), the memory `probe` and the `clock`. Models are named here as the registry resolved
them (`smollm2:135m`); finding them is the registry's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from xllm.engine.plugins import LoadSpec
from xllm.errors import InsufficientMemory, ModelLoadError
from xllm.memory import planner
from xllm.memory import probe as system_probe

if TYPE_CHECKING:
    from xllm.memory.probe import GPU
    from xllm.models.metadata import ModelInfo

log = logging.getLogger("xllm.models")

REAP_INTERVAL_S = 0.5
PRESSURE_INTERVAL_S = 1.0
HIGH_WATERMARK = 0.9
"""Above this fraction of RAM or of a GPU's memory in use, idle models are unloaded."""
GRACE_S = 1.0
"""A model handed to a request this recently is neither reaped nor evicted (it is about to run)."""
_RANK = {"low": 0, "normal": 1, "high": 2}


class Loaded(Protocol):
    """What the scheduler uses of an engine (`protocol.Engine` has it all)."""

    name: str
    key: str
    kind: str
    info: ModelInfo
    ctx_size: int
    plan: planner.Plan | None
    keep_alive: float
    """Seconds to stay loaded once idle; negative = forever."""
    last_active: float
    """When it last served (the clock's `now()`)."""
    on_exit: Callable[[Any], None] | None
    """Called with the engine when it ends on its own (a crash) or is closed."""

    @property
    def busy(self) -> bool: ...

    def abort(self, reason: str) -> None: ...

    async def close(self) -> None: ...


E = TypeVar("E", bound=Loaded)


class Prepare(Protocol):
    def __call__(
        self, name: str, key: str, *, ctx_size: int | None, engine: str | None
    ) -> Awaitable[LoadSpec]:
        """Everything instance `key` of model `name` needs to load, its memory plan included:
        `ctx_size` (a request's) over the model's own, `engine` (a request's) over the one its
        format and architecture pick."""


class MemoryProbe(Protocol):
    """RAM and GPUs as `xllm.memory.probe` reads them."""

    def ram(self) -> tuple[int, int]:
        """(total, free) bytes."""

    def gpus(self) -> list[GPU]: ...


class Clock(Protocol):
    """Monotonic time (the engines' `last_active` is on it too) and sleeping."""

    def now(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class MonotonicClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


@dataclass(frozen=True)
class LoadState:
    name: str
    """The instance's key."""
    started: float
    """Wall-clock time the load began."""


class Scheduler(Generic[E]):
    """Keeps the loaded engines: one load per instance, shared by concurrent callers."""

    def __init__(
        self,
        prepare: Prepare,
        load: Callable[[LoadSpec], Awaitable[E]],
        *,
        budget: int | None = None,
        priorities: dict[str, str] | None = None,
        replicas: dict[str, int] | None = None,
        high_watermark: float = HIGH_WATERMARK,
        probe: MemoryProbe = system_probe,
        clock: Clock | None = None,
    ) -> None:
        self.prepare = prepare
        self.load = load
        self.budget = budget
        """Bytes of RAM all loaded models may plan to use together (None: what is free)."""
        self.priorities = priorities or {}
        """Model name → `low`, `normal` or `high`: lower ones are unloaded first."""
        self.replicas = replicas or {}
        self.high_watermark = high_watermark
        self.probe = probe
        self.clock = clock if clock is not None else MonotonicClock()
        self._turns: dict[str, itertools.count[int]] = {}
        self._loaded: dict[str, E] = {}
        """Keyed by instance: the model's name, then `name#2`... for its further replicas."""
        self._loading: dict[str, asyncio.Task[E]] = {}
        self._load_started: dict[str, float] = {}
        self._loading_kind: dict[str, str] = {}
        self._watcher: asyncio.Task[None] | None = None
        self._restarts: set[asyncio.Task[None]] = set()
        self._reserved = 0
        """Bytes requests hold beyond their models' plans (`room`)."""

    @property
    def loaded(self) -> dict[str, E]:
        return dict(self._loaded)

    def loading(self) -> list[LoadState]:
        return [LoadState(k, self._load_started[k]) for k in self._loading]

    def loading_kinds(self) -> list[str]:
        """The engines loading a model now."""
        return list(self._loading_kind.values())

    def instances(self, name: str) -> list[E]:
        """Every loaded replica of model `name`."""
        return [m for m in self._loaded.values() if m.name == name]

    async def get(
        self,
        name: str,
        keep_alive: float | None = None,
        ctx_size: int | None = None,
        engine: str | None = None,
    ) -> E:
        """The loaded model `name` (its next replica in turn), loading it first if needed.

        `keep_alive` (seconds, negative = forever) replaces how long it stays loaded once idle.
        `ctx_size` (Ollama's `num_ctx`) reloads the model with that context per sequence if it
        was loaded with another, once its running requests are done, as Ollama does; requests
        that do not ask for a context take the model as it is. `engine` forces the engine kind,
        reloading a model loaded by another the same way.
        """
        key = self._next_instance(name)
        model = self._loaded.get(key)
        if model is not None and (
            (ctx_size is not None and not _has_context(model, ctx_size))
            or (engine is not None and model.kind != engine)
        ):
            log.info("reloading %s (context %s, engine %s)", key, ctx_size, engine or model.kind)
            while model.busy:  # `busy` comes from the engine's reports: polled, not awaited
                await self.clock.sleep(0.05)
            if self._loaded.get(key) is model:
                await self._unload_instance(key)
            model = None
        if model is None:
            model = await self._get_loading(name, key, ctx_size, engine)
        model.last_active = self.clock.now()
        if keep_alive is not None:
            for m in self.instances(name):
                m.keep_alive = keep_alive
        self._ensure_watch()
        return model

    async def preload(self, name: str) -> None:
        """Load a model and all its replicas."""
        for i in range(self.replicas.get(name, 1)):
            key = instance_key(name, i)
            if key not in self._loaded:
                await self._get_loading(name, key)
        self._ensure_watch()

    def _next_instance(self, name: str) -> str:
        """Round-robin over a model's replicas (just `name` for a model with one)."""
        n = self.replicas.get(name, 1)
        if n <= 1:
            return name
        turn = self._turns.setdefault(name, itertools.count())
        return instance_key(name, next(turn) % n)

    async def _get_loading(
        self, name: str, key: str, ctx_size: int | None = None, engine: str | None = None
    ) -> E:
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(name, key, ctx_size, engine))
            self._loading[key] = task
            self._load_started[key] = time.time()
        # shield: one impatient client leaving must not cancel a load others wait for
        return await asyncio.shield(task)

    async def _load(self, name: str, key: str, ctx_size: int | None, engine: str | None) -> E:
        t0 = self.clock.now()
        try:
            spec = await self.prepare(name, key, ctx_size=ctx_size, engine=engine)
            self._loading_kind[key] = spec.engine
            log.info("loading model %s from %s with engine %s", key, spec.path, spec.engine)
            if spec.plan is not None:
                await self._make_room(key, spec.plan)
                log.info(
                    "plan for %s: %s, %d GPU layers", key, spec.plan.describe(),
                    spec.plan.gpu_layers,
                )  # fmt: skip
            model = await self._start(spec)
        finally:
            self._loading.pop(key, None)
            self._load_started.pop(key, None)
            self._loading_kind.pop(key, None)
        model.key = key
        model.on_exit = self._on_exit
        self._loaded[key] = model
        elapsed = self.clock.now() - t0
        if spec.observer is not None:
            spec.observer.observe_load(name, elapsed)
        log.info("loaded model %s in %.2f s", key, elapsed)
        return model

    async def _start(self, spec: LoadSpec) -> E:
        """Load with the engine; after an out-of-memory failure with layers on a GPU, once more
        with half as many (as Ollama does) before giving up."""
        try:
            return await self.load(spec)
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
                spec.key, gpu_layers, fewer, e.message,
            )  # fmt: skip
            return await self.load(
                dataclasses.replace(spec, options=dataclasses.replace(o, gpu_layers=fewer))
            )

    @property
    def reserved(self) -> int:
        """RAM requests hold beyond their models' plans right now (`room`: a large image)."""
        return self._reserved

    def _available(self) -> int:
        """RAM a new model may use: the budget minus loaded models' plans, or what is free;
        less what requests hold beyond their models' plans (`room`)."""
        if self.budget is not None:
            planned = sum(m.plan.ram for m in self._loaded.values() if m.plan)
            return self.budget - planned - self._reserved
        return int(self.probe.ram()[1] * (1 - planner.SAFETY)) - self._reserved

    def _least_valuable(self, idle: list[E]) -> E:
        """Lowest priority first, then least recently used."""
        rank = self.priorities
        return min(idle, key=lambda m: (_RANK[rank.get(m.name, "normal")], m.last_active))

    async def _make_room(self, key: str, plan: planner.Plan) -> None:
        """Unload idle models (lowest priority, then least recently used) until `plan` fits."""
        await self._free(plan.ram, f"to load {key}: it needs {plan.describe()}")

    @contextlib.asynccontextmanager
    async def room(self, key: str, extra: int, what: str) -> AsyncIterator[None]:
        """Make room for `extra` bytes of RAM that loaded instance `key` takes beyond its plan
        while the block runs (`what` a request asks for, like a large image), unloading idle
        models other than it; InsufficientMemory when that is not enough. The bytes are held
        until the block ends: other loads and requests see them as taken."""
        extra = max(extra, 0)
        if extra:
            mib = extra / planner.MiB
            await self._free(
                extra, f"for {what} on {key}: it needs {mib:.0f} MiB beyond its plan", key
            )
        self._reserved += extra
        try:
            yield
        finally:
            self._reserved -= extra

    async def _free(self, need: int, why: str, keep: str | None = None) -> None:
        """Unload idle models but `keep` (lowest priority, then least recently used) until
        `need` bytes fit."""
        deadline = self.clock.now() + 10
        while need > self._available():
            idle = [m for k, m in self._loaded.items() if not m.busy and k != keep]
            if not idle:
                busy = ", ".join(self._loaded) or "none"
                limit = f"budget {self.budget / planner.MiB:.0f} MiB" if self.budget else "free RAM"
                raise InsufficientMemory(
                    f"not enough memory {why}; "
                    f"{max(self._available(), 0) / planner.MiB:.0f} MiB left of the {limit}; "
                    f"models in use: {busy}"
                )
            victim = self._least_valuable(idle)
            now = self.clock.now()
            if now - victim.last_active < GRACE_S and now < deadline:
                await self.clock.sleep(0.1)  # just handed to a request: let it start first
                continue
            log.info("unloading %s to make room %s", victim.key, why)
            await self._unload_instance(victim.key)

    def _ensure_watch(self) -> None:
        """The watch runs while models are loaded (it ends when none are left)."""
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Unload models idle past their keep_alive; above the high watermark of RAM or GPU
        memory, unload the least valuable idle model (one a second, so memory can settle)."""
        last_pressure = float("-inf")
        while self._loaded or self._loading:
            await self.clock.sleep(REAP_INTERVAL_S)
            now = self.clock.now()
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
        used, where = await asyncio.to_thread(memory_pressure, self.probe)
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

    def _on_exit(self, model: E) -> None:
        """An engine ended (crash, kill, unload): the next request loads the model afresh; one
        that stopped itself on purpose and asks to be restarted (`restart`) is loaded again now,
        in the background, so that the next request does not wait for the load (unless it was
        to be unloaded once idle: keep_alive 0)."""
        if self._loaded.get(model.key) is model:
            del self._loaded[model.key]
            if getattr(model, "restart", False) and model.keep_alive != 0:
                task = asyncio.create_task(self._restart(model))
                self._restarts.add(task)
                task.add_done_callback(self._restarts.discard)

    async def _restart(self, model: E) -> None:
        log.info("loading %s again (its engine stopped itself to cancel work)", model.key)
        try:
            again = await self._get_loading(model.name, model.key)
        except Exception as e:  # the next request loads it, or reports why it cannot
            log.warning("could not load %s again: %s", model.key, e)
            return
        again.keep_alive = model.keep_alive
        again.last_active = self.clock.now()
        self._ensure_watch()

    async def unload(self, name: str) -> bool:
        """Close every loaded replica of model `name`; False if it was not loaded."""
        keys = [k for k, m in self._loaded.items() if m.name == name]
        for k in keys:
            await self._unload_instance(k)
        return bool(keys)

    async def _unload_instance(self, key: str) -> None:
        model = self._loaded.pop(key, None)
        if model is not None:
            await model.close()

    def abort(self, reason: str) -> None:
        """End every generation of every loaded model with a 503 `reason` (shutting down)."""
        for model in self._loaded.values():
            model.abort(reason)

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        for task in [*self._loading.values(), *self._restarts]:
            task.cancel()
        models, self._loaded = list(self._loaded.values()), {}
        for m in models:
            await m.close()


def _has_context(model: Loaded, ctx_size: int) -> bool:
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


def memory_pressure(probe: MemoryProbe) -> tuple[float, str]:
    """The fullest of RAM and each GPU's memory: (fraction in use, which one)."""
    total, free = probe.ram()
    worst = (1 - free / total if total else 0.0, "RAM")
    for g in probe.gpus():
        if g.total_bytes:
            worst = max(worst, (1 - g.free_bytes / g.total_bytes, f"GPU {g.index} memory"))
    return worst
