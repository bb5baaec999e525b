"""The llama.cpp engine: one loaded GGUF model served by the Rust batching loop.

`xllm._core.Engine` owns the model, the llama.cpp context and the decode thread; this module
finds the `libllama` that llama-cpp-python ships, loads the model off the event loop, and turns
the engine's wake-ups into per-request asyncio queues (one `poll()` per wake-up, for all
requests).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import os
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any, Protocol

from xllm import _core
from xllm.errors import EngineError, InvalidRequest, ModelLoadError, Overloaded
from xllm.models.metadata import ModelInfo

Event = tuple[int, int, str, bytes | None, str | None, Any]
"""(request_id, choice_index, text, framed SSE bytes, finish_reason, extra) from the engine."""

# How often a request waiting for tokens checks whether its client is still there.
_DISCONNECT_CHECK_S = 0.25


def libllama_path() -> Path:
    """The libllama shared library inside the installed llama-cpp-python."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("llama-cpp-python is not installed")
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    for name in ("libllama.so", "libllama.dylib", "llama.dll"):
        if (lib_dir / name).exists():
            return lib_dir / name
    raise ModelLoadError(f"libllama not found in {lib_dir}")


def llama_cpp_version() -> str:
    return version("llama_cpp_python")


class Observer(Protocol):
    """Told about finished generations and loads (the metrics)."""

    def observe_finish(self, model: str, finish: str, extra: Mapping[str, Any]) -> None: ...

    def observe_load(self, model: str, seconds: float) -> None: ...


@dataclass(frozen=True)
class EngineOptions:
    """How a model is loaded: the knobs of `xllm serve` that reach llama.cpp."""

    ctx_size: int = 4096
    parallel: int = 16
    threads: int = 0
    batch_size: int = 512
    gpu_layers: int = -1
    max_queue: int = 1000

    def resolved_threads(self) -> int:
        return self.threads or (os.cpu_count() or 1)


@dataclass
class Generation:
    """One request's stream of engine events; `cancel()` frees its sequences."""

    model: LlamaModel
    request_id: int
    n: int
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def cancel(self) -> None:
        self.model._finish(self.request_id)

    async def events(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Event]]:
        """Yields batches of events (all that are ready) until every choice has finished.

        Stops early, cancelling the generation, when `is_disconnected()` turns true.
        """
        remaining = self.n
        try:
            while remaining:
                if self.queue.empty():
                    try:
                        async with asyncio.timeout(_DISCONNECT_CHECK_S):
                            first = await self.queue.get()
                    except TimeoutError:
                        if is_disconnected is not None and is_disconnected():
                            return
                        continue
                else:
                    first = self.queue.get_nowait()
                batch = [first]
                while not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                remaining -= sum(1 for ev in batch if ev[4] is not None)
                yield batch
        finally:
            if remaining:
                self.cancel()
            else:
                self.model._forget(self.request_id)


class LlamaModel:
    """A loaded GGUF model with its batching engine."""

    def __init__(
        self,
        name: str,
        path: Path,
        engine: _core.Engine,
        options: EngineOptions,
        observer: Observer | None = None,
    ):
        self.name = name
        self.observer = observer
        self.path = path
        self.engine = engine
        self.options = options
        self.info = ModelInfo.from_engine(name, path, engine)
        self.ctx_size = min(options.ctx_size, self.info.context_length or options.ctx_size)
        self._ids = itertools.count(1)
        self._queues: dict[int, asyncio.Queue[Event]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    async def load(
        cls, name: str, path: Path, options: EngineOptions, observer: Observer | None = None
    ) -> LlamaModel:
        """Load off the event loop (the engine releases the GIL while llama.cpp loads)."""
        lib = libllama_path()
        lib_version = llama_cpp_version()

        def build() -> _core.Engine:
            return _core.Engine(
                str(lib),
                lib_version,
                str(path),
                ctx_size=options.ctx_size,
                parallel=options.parallel,
                threads=options.resolved_threads(),
                batch_size=options.batch_size,
                gpu_layers=options.gpu_layers,
                max_queue=options.max_queue,
            )

        try:
            engine = await asyncio.to_thread(build)
        except (ValueError, RuntimeError, OSError) as e:
            raise ModelLoadError(f"failed to load model {name!r} from {path}: {e}") from None
        model = cls(name, path, engine, options, observer)
        model._start(asyncio.get_running_loop())
        return model

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.engine.fileno(), self._dispatch)

    def _dispatch(self) -> None:
        for ev in self.engine.poll():
            q = self._queues.get(ev[0])
            if q is not None:
                q.put_nowait(ev)
            if ev[4] is not None and self.observer is not None and isinstance(ev[5], dict):
                self.observer.observe_finish(self.name, ev[4], ev[5])

    def _finish(self, request_id: int) -> None:
        if self._queues.pop(request_id, None) is not None:
            self.engine.cancel(request_id)

    def _forget(self, request_id: int) -> None:
        self._queues.pop(request_id, None)

    # --- text -----------------------------------------------------------------------------

    # Async because a model may live in another process (its runner).

    async def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Tokens of `text`; `special` parses control tokens and adds BOS as the vocab wants."""
        return self.engine.tokenize(text, special, special)

    async def detokenize(self, tokens: Sequence[int]) -> str:
        return self.engine.detokenize(list(tokens))

    # --- serving --------------------------------------------------------------------------

    def start(
        self,
        prompt: list[int],
        params: Mapping[str, Any],
        frames: list[tuple[bytes, bytes]] | None = None,
    ) -> Generation:
        """Queue a generation; raises Overloaded when the queue is full."""
        rid = next(self._ids)
        gen = Generation(self, rid, int(params.get("n", 1)))
        self._queues[rid] = gen.queue
        try:
            self.engine.submit(rid, prompt, dict(params), frames)
        except _core.QueueFull:
            self._queues.pop(rid, None)
            raise Overloaded(
                f"model {self.name!r} has {self.options.max_queue} requests waiting; try again"
            ) from None
        except ValueError as e:
            self._queues.pop(rid, None)
            raise InvalidRequest(str(e)) from None
        except RuntimeError as e:
            self._queues.pop(rid, None)
            raise EngineError(f"model {self.name!r}: {e}") from None
        return gen

    async def embed(self, inputs: list[list[int]], normalize: bool = True) -> list[list[float]]:
        try:
            return await asyncio.to_thread(self.engine.embed, inputs, normalize)
        except ValueError as e:
            raise InvalidRequest(str(e)) from None
        except RuntimeError as e:
            raise EngineError(f"model {self.name!r}: embedding failed: {e}") from None

    def stats(self) -> dict[str, int | float]:
        return self.engine.stats()

    async def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.engine.fileno())
        await asyncio.to_thread(self.engine.close)
        self._dispatch_closed()

    def _dispatch_closed(self) -> None:
        with contextlib.suppress(Exception):
            self._dispatch()
