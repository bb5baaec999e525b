"""The Whisper engine as the server sees it: one Whisper model (CTranslate2 form, run by
faster-whisper) in its own runner process (engine/whisper_runner.py).

A crash of the runner ends that model's transcriptions with a 500 and drops the model, so the
next request loads it again; nothing else is touched. The model transcribes and translates
(`Transcriber`); asked to chat or complete text it refuses with a 400 naming `model`.
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
from typing import Any

from xllm.engine import ipc, whisper_runner
from xllm.engine.llama import _exit_reason, _pump_stderr
from xllm.engine.options import child_command
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.protocol import (
    ABI_VERSION,
    Capability,
    Generation,
    Observer,
    Request,
    Segment,
    Transcription,
)
from xllm.errors import EngineError, InvalidRequest, ModelLoadError, Overloaded, XllmError
from xllm.memory.planner import Plan
from xllm.models import folders
from xllm.models.metadata import ModelInfo
from xllm.models.modelfile import Modelfile

log = logging.getLogger("xllm.engine")

OVERHEAD = 192 << 20
"""What a Whisper runner takes beside its model's files: the interpreter, CTranslate2, PyAV and
decoding buffers (measured peak resident memory with word timestamps, minus the files: 159 MiB
for tiny.en, 173 MiB for base)."""
_CHECK_S = 0.25
_CLOSE_S = 10.0
_STDERR_LINES = 30
_END = object()


class WhisperTranscript:
    """One transcription's segments as the runner sends them (a `protocol.Transcript`)."""

    def __init__(self, model: WhisperClient, rid: int) -> None:
        self.model = model
        self.rid = rid
        self.duration = 0.0
        self.language = ""
        self.language_probability = 0.0
        self.seconds = 0.0
        """How long the runner took, once it has finished."""
        self.items: asyncio.Queue[Any] = asyncio.Queue()
        self.finished = False

    def put(self, item: Any) -> None:
        self.items.put_nowait(item)

    async def segments(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[Segment]:
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


class WhisperClient:
    """A Whisper model in its runner process (a `protocol.Engine` and `Transcriber`)."""

    kind = "faster-whisper"

    def __init__(
        self,
        spec: LoadSpec,
        info: ModelInfo,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        tail: collections.deque[str],
        stderr_task: asyncio.Task[None],
    ) -> None:
        self.name = spec.name
        self.key = spec.key
        self.info = info
        self.ctx_size = 0
        self.plan: Plan | None = spec.plan
        self.modelfile: Modelfile = spec.modelfile
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = time.monotonic()
        self.on_exit: Callable[[Any], None] | None = None
        self.observer: Observer | None = spec.observer
        self.languages: Sequence[str] = whisper_runner.languages(info)
        self.alive = True
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self._tail = tail
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._running: dict[int, WhisperTranscript] = {}
        self._stats: dict[str, int | float] = {}
        self._closing = False
        self._aborted: str | None = None
        self._tasks = [stderr_task, asyncio.create_task(self._read_loop())]

    @classmethod
    async def load(cls, spec: LoadSpec) -> WhisperClient:
        parent, child = socket.socketpair()
        try:
            proc = await asyncio.create_subprocess_exec(
                *child_command("runner"), "--engine", "whisper",
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
        return cls(spec, msg[1], proc, reader, writer, tail, stderr_task)

    async def _read_loop(self) -> None:
        while (msg := await ipc.read(self._reader)) is not None:
            op = msg[0]
            if op == ipc.BEAT:
                self._stats = msg[1]
            elif op == ipc.REPLY:
                fut = self._pending.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2:])
            elif (t := self._running.get(msg[1])) is not None:
                self._dispatch(t, op, msg[2:])
        code = await self._proc.wait()
        self._fail_all(f"the runner process for model {self.name!r} {_exit_reason(code)}; "
                       "the request was aborted")  # fmt: skip

    def _dispatch(self, t: WhisperTranscript, op: str, args: tuple[Any, ...]) -> None:
        if op == whisper_runner.INFO:  # before the first segment
            t.language, t.language_probability = args
        elif op == whisper_runner.SEGMENT:
            t.put(args[0])
        elif op == whisper_runner.DONE:
            error, t.seconds = args
            self._running.pop(t.rid, None)
            self.last_active = time.monotonic()
            t.put(ipc.exception(error, self.name) if error is not None else _END)

    def _fail_all(self, reason: str) -> None:
        self.alive = False
        if not self._closing:
            log.error("%s; its last output:\n%s", reason, "\n".join(self._tail))
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(EngineError(reason))
        self._pending.clear()
        for t in self._running.values():
            t.put(EngineError(reason))
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
        return frozenset({Capability.TRANSCRIPTION})

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def busy(self) -> bool:
        return bool(self._running or self._pending)

    async def generate(self, request: Request) -> Generation:
        raise InvalidRequest(
            f"model {self.name!r} is a speech recognition model: it transcribes audio "
            "(POST /v1/audio/transcriptions) and does not generate text from a prompt",
            param="model",
        )

    async def transcribe(self, request: Transcription) -> WhisperTranscript:
        """Send the upload to the runner, which decodes it (a 400 for a bad file) and queues
        it; returns once it is queued."""
        if self._aborted is not None:
            raise Overloaded(self._aborted)
        if not self.alive:
            raise EngineError(f"model {self.name!r} is not running")
        self._check(request)
        rid = next(self._ids)
        self.last_active = time.monotonic()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        transcript = WhisperTranscript(self, rid)
        self._running[rid] = transcript
        try:
            self._writer.write(ipc.encode((ipc.SUBMIT, rid, request)))
            error, duration = await fut
        except BaseException:
            self._pending.pop(rid, None)
            self._finish(rid)
            raise
        if error is not None:
            self._running.pop(rid, None)
            raise ipc.exception(error, self.name)
        transcript.duration = duration
        return transcript

    def _check(self, request: Transcription) -> None:
        multilingual = len(self.languages) > 1
        if request.language is not None and request.language not in self.languages:
            known = ", ".join(self.languages) if len(self.languages) < 10 else "ISO-639-1 codes"
            why = "is English-only" if not multilingual else f"knows {known}"
            raise InvalidRequest(
                f"language: {request.language!r} is not a language model {self.name!r} "
                f"transcribes (it {why})",
                param="language",
            )
        if request.task == "translate" and not multilingual:
            raise InvalidRequest(
                f"model: {self.name!r} is English-only and cannot translate; use a "
                "multilingual Whisper model (whisper:base)",
                param="model",
            )

    def stats(self) -> dict[str, int | float]:
        return dict(self._stats)

    def expires_at(self) -> float | None:
        if self.keep_alive < 0:
            return None
        idle_since = time.monotonic() if self.busy else self.last_active
        return time.time() + (idle_since + self.keep_alive - time.monotonic())

    def abort(self, reason: str) -> None:
        self._aborted = reason
        for rid, t in list(self._running.items()):
            if self.alive:
                self._writer.write(ipc.encode((ipc.CANCEL, rid)))
            t.put(Overloaded(reason))
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


def estimate(spec: LoadSpec, overhead: int = OVERHEAD) -> Plan:
    """A speech model's memory plan: its files and a measured overhead, in RAM (a GPU, where
    one is used, holds less than the files)."""
    return Plan(weights=folders.size(spec.path), kv=0, compute=overhead, output=0, layers=0,
                gpu_layers=0, vram=0)  # fmt: skip


async def _load(spec: LoadSpec) -> WhisperClient:
    options = dataclasses.replace(spec.options, splits=(), adapters=())
    return await WhisperClient.load(dataclasses.replace(spec, options=options))


def _version() -> str:
    from importlib.metadata import version

    return version("faster-whisper")


MANIFEST = Manifest(
    name="faster-whisper",
    version=_version(),
    abi=ABI_VERSION,
    formats=("ctranslate2",),
    architectures=frozenset({"whisper"}),
    capabilities=frozenset({Capability.TRANSCRIPTION}),
    load=_load,
    estimate=estimate,
)
"""The built-in speech recognition engine: Whisper models on faster-whisper, each in its own
runner process."""
