"""Runner processes of the engines written in Python (Whisper, Piper): the server's side of one
(`ProcessClient`, a request's `Stream`) and the runner's (`main`, its `serve` loop).

Each model runs in a child process (`xllm runner --engine NAME`) so that a crash in its native
library takes down that model only. The two ends speak engine/ipc.py's frames:

    server -> runner   (SUBMIT, rid, request) · (CANCEL, rid) · (CLOSE,)
    runner -> server   (READY, *facts) | (FAILED, message) at start
                       (REPLY, rid, WireError | None, *values): the request is taken, or refused
                       (OP, rid, *args) as the engine defines them, until it says it is done
                       (BEAT, stats)

The llama.cpp runner (engine/runner.py) shares only the process handling (`exit_reason`,
`pump_stderr`, `expires_at`, `stop`): its tokens travel on a socket of their own, written by
the Rust loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from xllm.engine import ipc
from xllm.engine.options import EngineOptions, child_command
from xllm.errors import EngineError, ModelLoadError, Overloaded, XllmError

if TYPE_CHECKING:  # the runner's side imports this module too: it stays light
    from xllm.engine.plugins import LoadSpec
    from xllm.engine.protocol import Observer
    from xllm.memory.planner import Plan
    from xllm.models.metadata import ModelInfo
    from xllm.models.modelfile import Modelfile

log = logging.getLogger("xllm.engine")

_CHECK_S = 0.25
"""How often a stream with nothing to read checks whether its client went away."""
_CLOSE_S = 10.0
STDERR_LINES = 30
"""The runner's last lines of output kept for the error of a failed load or a crash."""
END = object()
"""What a stream is given after its last item."""

T = TypeVar("T")


def exit_reason(code: int | None) -> str:
    if code is None:
        return "stopped"
    if code == -signal.SIGILL:
        # llama.cpp built for another CPU, or its AMX kernels in a VM that advertises AMX
        return (
            "was killed by SIGILL (an instruction this CPU does not run: rebuild its engine for"
            " this machine, on a CPU with AMX without AMX; see the README's install section)"
        )
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def expires_at(keep_alive: float, busy: bool, last_active: float) -> float | None:
    """Wall-clock time a model unloads if nothing uses it (`keep_alive` seconds after it was
    last active, or from now while busy); None = never."""
    if keep_alive < 0:
        return None
    idle_since = time.monotonic() if busy else last_active
    return time.time() + (idle_since + keep_alive - time.monotonic())


async def stop(
    name: str,
    proc: asyncio.subprocess.Process,
    writer: asyncio.StreamWriter,
    alive: bool,
    tasks: list[asyncio.Task[None]],
) -> None:
    """Ask a runner to exit (`CLOSE`: running requests end as cancelled), kill it if it has not
    within `_CLOSE_S`, let the client's tasks end and close the pipe."""
    if alive:
        with contextlib.suppress(ConnectionError):
            writer.write(ipc.encode((ipc.CLOSE,)))
    try:
        await asyncio.wait_for(proc.wait(), _CLOSE_S)
    except TimeoutError:
        log.warning("runner of %s did not exit in %.0f s: killing it", name, _CLOSE_S)
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
    for task in tasks:
        if task is not asyncio.current_task():
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(task, 2.0)
    writer.close()


async def pump_stderr(
    proc: asyncio.subprocess.Process, name: str, tail: collections.deque[str]
) -> None:
    """The runner's own log lines (its native library's): kept for error messages, logged at
    debug level."""
    assert proc.stderr is not None
    runner_log = logging.getLogger(f"xllm.runner.{name}")
    async for raw in proc.stderr:
        line = raw.decode("utf-8", "replace").rstrip()
        if line:
            tail.append(line)
            runner_log.debug("%s", line)


# --- the server's side --------------------------------------------------------------------


class Stream(Generic[T]):
    """One request's items as its runner sends them, read by one consumer."""

    def __init__(self, client: ProcessClient[Any], rid: int) -> None:
        self.client = client
        self.rid = rid
        self._items: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False

    def put(self, item: T | XllmError | object) -> None:
        self._items.put_nowait(item)

    async def _read(self, is_disconnected: Callable[[], bool] | None = None) -> AsyncIterator[T]:
        """The items until the end (an error raises), or until `is_disconnected()` says the
        client left; a stream left early is cancelled in the runner."""
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self._items.get(), _CHECK_S)
                except TimeoutError:
                    if is_disconnected is not None and is_disconnected():
                        return
                    continue
                if item is END:
                    self.finished = True
                    return
                if isinstance(item, XllmError):
                    self.finished = True
                    raise item
                yield item
        finally:
            if not self.finished:
                self.cancel()

    def cancel(self) -> None:
        self.finished = True
        self.client._finish(self.rid)


S = TypeVar("S", bound=Stream[Any])


class ProcessClient(Generic[S]):
    """A model in its runner process, as the server sees it: the engine protocol's bookkeeping
    (keep-alive, stats, abort, close, a crash failing every request) for engines whose requests
    are a `SUBMIT`, a `REPLY` and then a stream. A subclass names its `engine` and dispatches
    the stream's messages (`_dispatch`)."""

    engine: ClassVar[str]
    """The runner's `--engine`."""

    def __init__(self, spec: LoadSpec, ready: tuple[Any, ...], spawned: Spawned) -> None:
        self.name = spec.name
        self.key = spec.key
        self.ctx_size = 0
        self.plan: Plan | None = spec.plan
        self.modelfile: Modelfile = spec.modelfile
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = time.monotonic()
        self.on_exit: Callable[[Any], None] | None = None
        self.observer: Observer | None = spec.observer
        self.alive = True
        self._proc, self._reader, self._writer, self._tail, stderr_task = spawned
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._running: dict[int, S] = {}
        self._stats: dict[str, int | float] = {}
        self._closing = False
        self._aborted: str | None = None
        self._tasks = [stderr_task, asyncio.create_task(self._read_loop())]

    @classmethod
    async def spawn(cls, spec: LoadSpec) -> tuple[tuple[Any, ...], Spawned]:
        """Start the runner and wait for its `READY` facts; a failed load is a
        `ModelLoadError` with the runner's reason and last lines."""
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *child_command("runner"), "--engine", cls.engine,
                "--fd", str(child.fileno()), "--name", spec.name, "--model", str(spec.path),
                "--options", json.dumps(asdict(spec.options)),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        finally:
            child.close()
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        stderr_task = asyncio.create_task(pump_stderr(proc, spec.name, tail))
        reader, writer = await asyncio.open_connection(sock=parent)
        msg = await ipc.read(reader)
        if msg is None or msg[0] != ipc.READY:
            writer.close()
            code = await proc.wait()
            await stderr_task
            reason = msg[1] if msg is not None else f"its runner process {exit_reason(code)}"
            detail = "\n".join(tail)
            log.error("model %s failed to load: %s; its runner said:\n%s", spec.name, reason,
                      detail)  # fmt: skip
            raise ModelLoadError(
                f"failed to load model {spec.name!r} from {spec.path}: {reason}", detail=detail
            )
        return msg[1:], (proc, reader, writer, tail, stderr_task)

    async def _read_loop(self) -> None:
        while (msg := await ipc.read(self._reader)) is not None:
            op = msg[0]
            if op == ipc.BEAT:
                self._stats = msg[1]
            elif op == ipc.REPLY:
                fut = self._pending.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2:])
            elif (stream := self._running.get(msg[1])) is not None:
                self._dispatch(stream, op, msg[2:])
        code = await self._proc.wait()
        self._fail_all(f"the runner process for model {self.name!r} {exit_reason(code)}; "
                       "the request was aborted")  # fmt: skip

    def _dispatch(self, stream: S, op: str, args: tuple[Any, ...]) -> None:
        raise NotImplementedError

    def _done(self, stream: S, error: ipc.WireError | None) -> None:
        """The runner has finished `stream`: its end, or its error."""
        self._running.pop(stream.rid, None)
        self.last_active = time.monotonic()
        stream.put(ipc.exception(error, self.name) if error is not None else END)

    async def _submit(self, request: Any, stream: Callable[[int], S]) -> tuple[S, tuple[Any, ...]]:
        """Send `request` and wait for the runner to take it: its stream and the reply's
        values; the runner's refusal raises (a 400 for a bad request, a 503 when full)."""
        if self._aborted is not None:
            raise Overloaded(self._aborted)
        if not self.alive:
            raise EngineError(f"model {self.name!r} is not running")
        rid = next(self._ids)
        self.last_active = time.monotonic()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._running[rid] = s = stream(rid)
        try:
            self._writer.write(ipc.encode((ipc.SUBMIT, rid, request)))
            error, *values = await fut
        except BaseException:
            self._pending.pop(rid, None)
            self._finish(rid)
            raise
        if error is not None:
            self._running.pop(rid, None)
            raise ipc.exception(error, self.name)
        return s, tuple(values)

    def _fail_all(self, reason: str) -> None:
        self.alive = False
        if not self._closing:
            log.error("%s; its last output:\n%s", reason, "\n".join(self._tail))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineError(reason))
        self._pending.clear()
        for stream in self._running.values():
            stream.put(EngineError(reason))
        self._running.clear()
        if self.on_exit is not None:
            self.on_exit(self)

    def _finish(self, rid: int) -> None:
        self.last_active = time.monotonic()
        if self._running.pop(rid, None) is not None and self.alive:
            self._writer.write(ipc.encode((ipc.CANCEL, rid)))

    # --- the engine protocol ----------------------------------------------------------------

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def busy(self) -> bool:
        return bool(self._running or self._pending)

    def stats(self) -> dict[str, int | float]:
        return dict(self._stats)

    def expires_at(self) -> float | None:
        return expires_at(self.keep_alive, self.busy, self.last_active)

    def abort(self, reason: str) -> None:
        self._aborted = reason
        for rid, stream in list(self._running.items()):
            if self.alive:
                self._writer.write(ipc.encode((ipc.CANCEL, rid)))
            stream.put(Overloaded(reason))
        self._running.clear()

    async def close(self) -> None:
        self._closing = True
        await stop(self.name, self._proc, self._writer, self.alive, self._tasks)


Spawned = tuple[
    asyncio.subprocess.Process,
    asyncio.StreamReader,
    asyncio.StreamWriter,
    collections.deque[str],
    "asyncio.Task[None]",
]


# --- the runner's side --------------------------------------------------------------------


RUNNER_BEAT_S = 0.5
"""How often a Python engine's runner reports its counters (the server's stats and watchdog
read them)."""


async def beat(
    stats: dict[str, int | float],
    queue: asyncio.Queue[Any],
    send: Callable[[tuple[Any, ...]], None],
) -> None:
    """A runner's heartbeat: its counters, the queue's depth among them, every RUNNER_BEAT_S."""
    while True:
        stats["queue_depth"] = queue.qsize()
        send((ipc.BEAT, dict(stats)))
        await asyncio.sleep(RUNNER_BEAT_S)


def folder_info(name: str, path: Path) -> ModelInfo:
    """What `show` and `ps` say of a model stored as a folder of parts (speech, images)."""
    from xllm.models import folders, summary
    from xllm.models.metadata import ModelInfo

    facts = summary.of_file(path)
    meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in facts.model_info.items()}
    return ModelInfo(
        name=name, path=path, architecture=facts.architecture, context_length=0,
        embedding_length=0, block_count=0, parameter_count=facts.parameter_count,
        size=folders.size(path), quantization=facts.quantization, chat_template=None,
        metadata=meta, format=facts.format,
    )  # fmt: skip


class Jobs(Protocol):
    """A runner's engine: takes requests (replying `REPLY` to each), works through them, and
    beats its counters."""

    async def submit(self, rid: int, request: Any) -> None: ...

    def cancel(self, rid: int) -> None: ...

    async def work(self) -> None: ...

    async def beat(self) -> None: ...

    def stop(self) -> None:
        """Stop whatever is running (the server closed the runner)."""


def main(
    fd: int,
    name: str,
    path: Path,
    options_json: str,
    load: Callable[[str, Path, EngineOptions], tuple[tuple[Any, ...], T]],
    jobs: Callable[[T, asyncio.StreamWriter, EngineOptions], Jobs],
) -> int:
    """Serve one model to the server at the other end of socket `fd`: `load` (on a worker
    thread) gives the `READY` facts and the model, `jobs` the engine around it."""
    ipc.die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when we stop
    options = EngineOptions.from_json(options_json)
    asyncio.run(_serve(socket.socket(fileno=fd), name, path, options, load, jobs))
    return 0


async def _serve(
    sock: socket.socket,
    name: str,
    path: Path,
    options: EngineOptions,
    load: Callable[[str, Path, EngineOptions], tuple[tuple[Any, ...], T]],
    jobs: Callable[[T, asyncio.StreamWriter, EngineOptions], Jobs],
) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        facts, model = await asyncio.to_thread(load, name, path, options)
    except Exception as e:  # the server reports whatever stopped the load
        writer.write(ipc.encode((ipc.FAILED, f"{type(e).__name__}: {e}")))
        await writer.drain()
        return
    writer.write(ipc.encode((ipc.READY, *facts)))
    runner = jobs(model, writer, options)
    tasks = {asyncio.create_task(runner.work()), asyncio.create_task(runner.beat())}
    submits: set[asyncio.Task[None]] = set()
    try:
        while (msg := await ipc.read(reader)) is not None:
            if msg[0] == ipc.SUBMIT:
                task = asyncio.create_task(runner.submit(msg[1], msg[2]))
                submits.add(task)
                task.add_done_callback(submits.discard)
            elif msg[0] == ipc.CANCEL:
                runner.cancel(msg[1])
            elif msg[0] == ipc.CLOSE:
                break
    finally:
        runner.stop()
        for t in tasks:
            t.cancel()
        writer.close()
