"""The Piper engine as the server sees it: one Piper voice in its own runner process
(engine/piper_runner.py).

A crash of the runner ends that voice's syntheses with a 500 and drops the model, so the next
request loads it again; nothing else is touched. The voice speaks (`Speaker`); asked to chat or
complete text it refuses with a 400 naming `model`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from xllm.engine import ipc, piper_runner
from xllm.engine.llama import _exit_reason, _pump_stderr
from xllm.engine.options import child_command
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.protocol import ABI_VERSION, Capability, Generation, Observer, Request, Speech
from xllm.errors import EngineError, InvalidRequest, ModelLoadError, Overloaded, XllmError
from xllm.memory.planner import Plan
from xllm.models.metadata import ModelInfo
from xllm.models.modelfile import Modelfile

log = logging.getLogger("xllm.engine")

OVERHEAD = 288 << 20
"""What a Piper runner takes beside its voice's files: the interpreter, onnxruntime, espeak-ng
and the synthesis buffers (measured: a peak resident memory of 349 MiB with the Joe voice after a
4,096-character request, less its 60 MiB of files)."""
_CHECK_S = 0.25
_CLOSE_S = 10.0
_STDERR_LINES = 30
_END = object()


class PiperUtterance:
    """One synthesis's audio as the runner sends it (a `protocol.Utterance`)."""

    def __init__(self, model: PiperClient, rid: int) -> None:
        self.model = model
        self.rid = rid
        self.sample_rate = model.sample_rate
        self.input_tokens = 0
        """Phoneme ids the voice reads."""
        self.output_tokens = 0
        """Decoder frames it made (known once the audio has ended)."""
        self.seconds = 0.0
        """Time the runner spent synthesizing (known once the audio has ended)."""
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False

    async def audio(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[bytes]:
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.items.get(), _CHECK_S)
                except TimeoutError:
                    if is_disconnected is not None and is_disconnected():
                        return
                    continue
                if item is _END:
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
        self.model._finish(self.rid)


class PiperClient:
    """A Piper voice in its runner process (a `protocol.Engine` and `Speaker`)."""

    kind = "piper"

    def __init__(
        self,
        spec: LoadSpec,
        ready: tuple[Any, ...],
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tail: collections.deque[str],
        stderr_task: asyncio.Task[None],
    ) -> None:
        self.name = spec.name
        self.key = spec.key
        self.info: ModelInfo = ready[0]
        self.voices: Sequence[str] = ready[1]
        self.sample_rate: int = ready[2]
        self.ctx_size = 0
        self.plan: Plan | None = spec.plan
        self.modelfile: Modelfile = spec.modelfile
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = time.monotonic()
        self.on_exit: Callable[[Any], None] | None = None
        self.observer: Observer | None = spec.observer
        self.alive = True
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self._tail = tail
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._running: dict[int, PiperUtterance] = {}
        self._stats: dict[str, int | float] = {}
        self._closing = False
        self._aborted: str | None = None
        self._tasks = [stderr_task, asyncio.create_task(self._read_loop())]

    @classmethod
    async def load(cls, spec: LoadSpec) -> PiperClient:
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *child_command("runner"), "--engine", "piper",
                "--fd", str(child.fileno()), "--name", spec.name, "--model", str(spec.path),
                "--options", json.dumps(asdict(spec.options)),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        finally:
            child.close()
        tail: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES)
        stderr_task = asyncio.create_task(_pump_stderr(proc, spec.name, tail))
        reader, writer = await asyncio.open_connection(sock=parent)
        msg = await ipc.read(reader)
        if msg is None or msg[0] != ipc.READY:
            writer.close()
            code = await proc.wait()
            await stderr_task
            reason = msg[1] if msg is not None else f"its runner process {_exit_reason(code)}"
            detail = "\n".join(tail)
            log.error("model %s failed to load: %s; its runner said:\n%s", spec.name, reason,
                      detail)  # fmt: skip
            raise ModelLoadError(
                f"failed to load model {spec.name!r} from {spec.path}: {reason}", detail=detail
            )
        return cls(spec, msg[1:], proc, reader, writer, tail, stderr_task)

    async def _read_loop(self) -> None:
        while (msg := await ipc.read(self._reader)) is not None:
            op = msg[0]
            if op == ipc.BEAT:
                self._stats = msg[1]
            elif op == ipc.REPLY:
                fut = self._pending.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2:])
            elif (u := self._running.get(msg[1])) is not None:
                if op == piper_runner.AUDIO:
                    u.items.put_nowait(msg[2])
                elif op == piper_runner.DONE:
                    error, u.output_tokens, u.seconds = msg[2:]
                    self._running.pop(u.rid, None)
                    self.last_active = time.monotonic()
                    u.items.put_nowait(ipc.exception(error, self.name) if error else _END)
        code = await self._proc.wait()
        self._fail_all(f"the runner process for model {self.name!r} {_exit_reason(code)}; "
                       "the request was aborted")  # fmt: skip

    def _fail_all(self, reason: str) -> None:
        self.alive = False
        if not self._closing:
            log.error("%s; its last output:\n%s", reason, "\n".join(self._tail))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineError(reason))
        self._pending.clear()
        for u in self._running.values():
            u.items.put_nowait(EngineError(reason))
        self._running.clear()
        if self.on_exit is not None:
            self.on_exit(self)

    def _finish(self, rid: int) -> None:
        self.last_active = time.monotonic()
        if self._running.pop(rid, None) is not None and self.alive:
            self._writer.write(ipc.encode((ipc.CANCEL, rid)))

    # --- the engine protocol ----------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset({Capability.SPEECH})

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def busy(self) -> bool:
        return bool(self._running or self._pending)

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(
            f"model {self.name!r} is a voice: it speaks text (POST /v1/audio/speech) and does "
            "not generate text from a prompt",
            param="model",
        )

    async def speak(self, request: Speech) -> PiperUtterance:
        """Send the text to the runner, which checks and plans it (a 400 for a voice it lacks
        or text with nothing to say) and gives it its turns; returns once it has them."""
        if self._aborted is not None:
            raise Overloaded(self._aborted)
        if not self.alive:
            raise EngineError(f"model {self.name!r} is not running")
        rid = next(self._ids)
        self.last_active = time.monotonic()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        utterance = PiperUtterance(self, rid)
        self._running[rid] = utterance
        try:
            self._writer.write(ipc.encode((ipc.SUBMIT, rid, request)))
            error, phonemes = await fut
        except BaseException:
            self._pending.pop(rid, None)
            self._finish(rid)
            raise
        if error is not None:
            self._running.pop(rid, None)
            raise ipc.exception(error, self.name)
        utterance.input_tokens = phonemes
        return utterance

    def stats(self) -> dict[str, int | float]:
        return dict(self._stats)

    def expires_at(self) -> float | None:
        if self.keep_alive < 0:
            return None
        idle_since = time.monotonic() if self.busy else self.last_active
        return time.time() + (idle_since + self.keep_alive - time.monotonic())

    def abort(self, reason: str) -> None:
        self._aborted = reason
        for rid, u in list(self._running.items()):
            if self.alive:
                self._writer.write(ipc.encode((ipc.CANCEL, rid)))
            u.items.put_nowait(Overloaded(reason))
        self._running.clear()

    async def close(self) -> None:
        self._closing = True
        if self.alive:
            with contextlib.suppress(ConnectionError):
                self._writer.write(ipc.encode((ipc.CLOSE,)))
        try:
            await asyncio.wait_for(self._proc.wait(), _CLOSE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()
        for task in self._tasks:
            if task is not asyncio.current_task():
                with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                    await asyncio.wait_for(task, 2.0)
        self._writer.close()


def _files_size(path: Path) -> int:
    """A voice's bytes: its folder's files, or its .onnx with the .onnx.json beside it."""
    files = path.iterdir() if path.is_dir() else path.parent.glob(f"{path.name}*")
    return sum(p.stat().st_size for p in files if p.is_file())


def _estimate(spec: LoadSpec) -> Plan:
    """The voice's files and a measured overhead, in RAM."""
    return Plan(weights=_files_size(spec.path), kv=0, compute=OVERHEAD, output=0, layers=0,
                gpu_layers=0, vram=0)  # fmt: skip


async def _load(spec: LoadSpec) -> PiperClient:
    options = dataclasses.replace(spec.options, splits=(), adapters=())
    return await PiperClient.load(dataclasses.replace(spec, options=options))


def _version() -> str:
    from importlib.metadata import version

    return version("piper-tts")


MANIFEST = Manifest(
    name="piper",
    version=_version(),
    abi=ABI_VERSION,
    formats=("piper",),
    architectures=frozenset({"piper"}),
    capabilities=frozenset({Capability.SPEECH}),
    load=_load,
    estimate=_estimate,
)
"""The built-in speech synthesis engine: Piper voices on onnxruntime, each in its own runner
process."""
