"""The llama.cpp engine as the server sees it: one loaded GGUF model in its runner process.

`xllm._core.Engine` (the Rust batching loop over libllama) lives in the runner
(`engine/runner.py`); this proxy sends it requests over the runner's control socket, and reads
the deltas the loop sends on a socket of their own (`_core.read_deltas`: no Python in the
runner touches a token) into per-request inboxes. If the runner dies or stops making
progress, every request in flight ends with an error delta at once, and the registry drops the
model so the next request reloads it.
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
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from xllm import _core
from xllm.engine import ipc, llama_prompt, process
from xllm.engine.inbox import Inbox
from xllm.engine.llamacpp_archs import ARCHITECTURES
from xllm.engine.options import EngineOptions, child_command, llama_cpp_version
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.process import STDERR_LINES, exit_reason, pump_stderr
from xllm.engine.protocol import ABI_VERSION, Capability, Delta, Image, Observer, Request
from xllm.errors import EngineError, InvalidRequest, ModelLoadError, Overloaded
from xllm.grammar import Grammar
from xllm.memory import planner, probe
from xllm.memory.planner import Plan
from xllm.models import gguf, loras
from xllm.models import projector as mmproj
from xllm.models.metadata import ModelInfo
from xllm.models.modelfile import Modelfile

log = logging.getLogger("xllm.engine")

# How often a request waiting for tokens checks whether its client is still there.
_DISCONNECT_CHECK_S = 0.25


@dataclass
class Generation:
    """One request's stream of deltas (a `protocol.Generation`); `cancel()` frees its
    sequences. A delta of choice -1 with finish "error" ends every choice: the runner died, or
    the server cut the request while shutting down (then its `error` is the XllmError to
    report)."""

    model: RunnerClient
    request_id: int
    n: int
    inbox: Inbox = field(default_factory=Inbox)
    prompt_tokens: list[int] = field(default_factory=list)
    opens_thinking: bool | None = None

    def cancel(self) -> None:
        self.model._finish(self.request_id)

    async def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        """Yields batches of deltas (all that are ready) until every choice has finished.

        Stops early, cancelling the generation, when `is_disconnected()` turns true.
        """
        remaining = self.n
        if is_disconnected is not None:
            self.inbox.watch(is_disconnected, _DISCONNECT_CHECK_S)
        try:
            while remaining:
                batch = await self.inbox.take()
                if not batch:  # the client is gone
                    return
                for d in batch:
                    if d.finish is not None:
                        remaining = 0 if d.choice < 0 else remaining - 1
                yield batch
        finally:
            self.inbox.unwatch()
            if remaining:
                self.cancel()
            else:
                self.model._forget(self.request_id)


class RunnerClient:
    """The llama.cpp engine for one loaded GGUF model: the server's client of the model's runner
    process (a `protocol.Engine`)."""

    kind = "llama.cpp"

    def __init__(
        self,
        name: str,
        path: Path,
        options: EngineOptions,
        info: ModelInfo,
        proc: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        deltas: socket.socket,
        observer: Observer | None,
        stderr_tail: collections.deque[str],
        stderr_task: asyncio.Task[None],
    ) -> None:
        self.name = name
        self.key = name
        """The registry's key for this instance: `name`, or `name#2`... for further replicas."""
        self.path = path
        self.options = options
        self.info = info
        self.observer = observer
        self.ctx_size = min(options.ctx_size, info.context_length or options.ctx_size)
        self.on_exit: Callable[[RunnerClient], None] | None = None
        self.plan: Plan | None = None
        self.modelfile = Modelfile()
        """A stored model's Modelfile: SYSTEM, MESSAGE and PARAMETER defaults for requests."""
        self._proc = proc
        self._reader = reader
        self._writer = writer
        self._deltas = deltas
        deltas.setblocking(False)
        asyncio.get_running_loop().add_reader(deltas.fileno(), self._read_deltas)
        self._stderr_tail = stderr_tail
        self._ids = itertools.count(1)
        self._queues: dict[int, Inbox] = {}
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._stats: dict[str, int | float] = {}
        self._own = tuple(map(Path, options.adapters))
        self._loras: dict[tuple[str, int, int], tuple[loras.Adapter, int]] = {}
        """Adapters loaded beyond the model's own, by file identity: (adapter, its index)."""
        self._loading = asyncio.Lock()
        self._progress = time.monotonic()
        self._closing = False
        self._aborted: str | None = None
        self.alive = True
        self.keep_alive = options.keep_alive_s
        """Seconds to stay loaded once idle (Ollama's keep_alive); negative = forever."""
        self.last_active = time.monotonic()
        self._watch = asyncio.create_task(self._watchdog())
        self._tasks = [stderr_task, asyncio.create_task(self._read_loop()), self._watch]

    @property
    def pid(self) -> int:
        return self._proc.pid

    @classmethod
    async def load(
        cls, name: str, path: Path, options: EngineOptions, observer: Observer | None = None
    ) -> RunnerClient:
        """Start a runner for `path` and wait until its engine has loaded the model."""
        parent, child = socket.socketpair()
        deltas, deltas_child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            proc = await asyncio.create_subprocess_exec(
                *child_command("runner"),
                "--fd", str(child.fileno()),
                "--deltas-fd", str(deltas_child.fileno()),
                "--name", name,
                "--model", str(path),
                "--options", json.dumps(asdict(options)),
                pass_fds=(child.fileno(), deltas_child.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
        except BaseException:
            deltas.close()
            raise
        finally:
            child.close()
            deltas_child.close()
        tail: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        stderr_task = asyncio.create_task(pump_stderr(proc, name, tail))
        reader, writer = await asyncio.open_connection(sock=parent)
        msg = await ipc.read(reader)
        if msg is None or msg[0] != ipc.READY:
            writer.close()
            deltas.close()
            code = await proc.wait()
            await stderr_task
            reason = msg[1] if msg is not None else f"its runner process {exit_reason(code)}"
            detail = "\n".join(tail)
            log.error("model %s failed to load: %s; its runner said:\n%s", name, reason, detail)
            hint = " (the server's log has llama.cpp's messages)" if detail else ""
            raise ModelLoadError(
                f"failed to load model {name!r} from {path}: {reason}{hint}", detail=detail
            )
        return cls(
            name, path, options, msg[1], proc, reader, writer, deltas, observer, tail, stderr_task
        )

    # --- delta pump -----------------------------------------------------------------------

    async def _read_loop(self) -> None:
        while (msg := await ipc.read(self._reader)) is not None:
            op = msg[0]
            if op == ipc.BEAT:
                if msg[1].get("decode_steps_total") != self._stats.get("decode_steps_total"):
                    self._progress = time.monotonic()
                self._stats = msg[1]
            elif op == ipc.REPLY:
                fut = self._calls.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg[2:])
        code = await self._proc.wait()
        self._read_deltas()  # the last ones the runner sent
        self._fail_all(
            f"the runner process for model {self.name!r} {exit_reason(code)}; "
            "the request was aborted"
        )

    def _read_deltas(self) -> None:
        """Hand what the batching loop sent to the requests' inboxes (and finishes to the
        metrics). Called whenever the deltas socket is readable."""
        if self._deltas.fileno() < 0:
            return
        batch = _core.read_deltas(self._deltas.fileno())
        if batch is None:  # the runner's end is closed: it is exiting
            self._close_deltas()
            return
        self._progress = time.monotonic()
        for d in batch:
            q = self._queues.get(d.request)
            if q is not None:
                q.put(d)
            if d.finish is not None and self.observer is not None and d.usage is not None:
                self.observer.observe_finish(self.name, d.finish, d.usage)

    def _close_deltas(self) -> None:
        if self._deltas.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self._deltas.fileno())
            self._deltas.close()

    def _fail_all(self, reason: str) -> None:
        """The runner is gone: end every request and call, and leave the registry. Clients
        get `reason`; its last lines of output (llama.cpp's log) go to the server's log only."""
        self.alive = False
        if not self._closing:
            log.error("%s; its last output:\n%s", reason, "\n".join(self._stderr_tail))
        for rid, q in self._queues.items():
            q.put(Delta(rid, -1, finish="error", error=reason))
        self._queues.clear()
        for fut in self._calls.values():
            if not fut.done():
                fut.set_exception(EngineError(reason))
        self._calls.clear()
        if self.on_exit is not None:
            self.on_exit(self)

    async def _watchdog(self) -> None:
        """Kill a runner that has work but makes no progress (a hung llama_decode)."""
        while self.alive:
            await asyncio.sleep(1.0)
            busy = self._queues or self._stats.get("running") or self._stats.get("queue_depth")
            stalled = time.monotonic() - self._progress
            if busy and stalled > self.options.watchdog_s:
                log.error(
                    "model %s made no progress for %.0f s with work pending: killing its runner",
                    self.name,
                    stalled,
                )
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()
                return
            if not busy:
                self._progress = time.monotonic()

    def _send(self, message: tuple[Any, ...]) -> None:
        if not self.alive:
            raise EngineError(f"model {self.name!r} is not running")
        self._writer.write(ipc.encode(message))

    async def _call(self, method: str, *args: Any) -> Any:
        cid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[cid] = fut
        self._send((ipc.CALL, cid, method, args))
        error, value = await fut
        if error is not None:
            raise ipc.exception(error, self.name)
        return value

    def _finish(self, request_id: int) -> None:
        self.last_active = time.monotonic()
        if self._queues.pop(request_id, None) is not None and self.alive:
            self._writer.write(ipc.encode((ipc.CANCEL, request_id)))

    def _forget(self, request_id: int) -> None:
        self.last_active = time.monotonic()
        self._queues.pop(request_id, None)

    # --- the engine protocol ----------------------------------------------------------------

    @property
    def capabilities(self) -> frozenset[Capability]:
        known = {c.value for c in Capability}
        return frozenset(Capability(c) for c in self.info.capabilities if c in known)

    async def generate(self, request: Request) -> Generation:
        """Render, tokenize and check `request` (engine/llama_prompt.py), then queue it."""
        prepared = await llama_prompt.prepare(self, request)
        gen = await self.start(prepared.tokens, prepared.params, prepared.images)
        # an image's tokens have no ids a client could send back
        gen.prompt_tokens = (
            [t for t in prepared.tokens if t >= 0] if prepared.images else prepared.tokens
        )
        gen.opens_thinking = prepared.opens_thinking
        return gen

    async def tokenize(self, text: str, *, special: bool) -> list[int]:
        """Tokens of `text`; `special` parses control tokens and adds BOS as the vocab wants."""
        tokens: list[int] = await self._call("tokenize", text, special, special)
        return tokens

    async def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None,
        template: str | None = None,
        enable_thinking: bool | None = None,
        images: Sequence[Image] = (),
    ) -> tuple[list[int], list[str], list[tuple[int, int]]]:
        """(prompt tokens, extra stops, each image's (start, length)) rendered by the model's
        template (or `template`, a request's own Jinja2 one); the messages' image markers
        stand for `images`, in order.

        A template is code from a model file or a request: the runner has its render worker
        run it under a time and memory limit (engine/render.py), so one that runs away fails
        with a 400 and the runner, with every other request on the model, carries on.
        """
        result: tuple[list[int], list[str], list[tuple[int, int]]] = await self._call(
            "chat_prompt", messages, tools, template, enable_thinking, list(images)
        )
        return result

    async def tokenize_media(
        self, text: str, images: Sequence[Image], param: str
    ) -> tuple[list[int], list[tuple[int, int]]]:
        """Tokens of a prompt whose image markers stand for `images` (-1 at image tokens), and
        each image's (start, length); a 400 naming `param` when they do not match."""
        result: tuple[list[int], list[tuple[int, int]]] = await self._call(
            "tokenize_media", text, list(images), param
        )
        return result

    async def detokenize(self, tokens: Sequence[int]) -> str:
        text: str = await self._call("detokenize", list(tokens))
        return text

    async def start(
        self,
        prompt: list[int],
        params: Mapping[str, Any],
        images: Sequence[tuple[int, int, Image]] = (),
    ) -> Generation:
        """Queue a generation; raises Overloaded when the queue is full. `images` are the
        prompt's ((start, length, image)) at its -1 positions.

        A grammar (`params["grammar"]`, a `Grammar`) is parsed by llama.cpp first: one it
        rejects is a 400 naming the field it came from, not a generation failing in the queue.
        """
        if self._aborted is not None:
            raise Overloaded(self._aborted)
        constraint: Grammar | None = params.get("grammar")
        if constraint is not None:
            if not await self._call("grammar_parses", constraint.text):
                raise InvalidRequest(
                    f"{constraint.param}: llama.cpp rejected the grammar made from it (its "
                    "parser's complaint is in the server log at debug level)",
                    param=constraint.param,
                )
            params = {**params, "grammar": constraint.text}
        rid = next(self._ids)
        self.last_active = time.monotonic()
        gen = Generation(self, rid, int(params.get("n", 1)))
        self._queues[rid] = gen.inbox
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[rid] = fut
        try:
            self._send((ipc.SUBMIT, rid, rid, prompt, {**params, "images": list(images)}))
            error, _ = await fut
            if error is not None:
                raise ipc.exception(error, self.name)
        except BaseException:
            self._queues.pop(rid, None)
            self._calls.pop(rid, None)
            raise
        return gen

    async def embed(self, inputs: list[list[int]], normalize: bool = True) -> list[list[float]]:
        vectors: list[list[float]] = await self._call("embed", inputs, normalize)
        return vectors

    async def adapter_set(
        self, lora: Sequence[tuple[str, float]] | None
    ) -> list[tuple[int, float]]:
        """The Rust loop's adapter set for a request's `lora` (names and scales): the model's
        own adapters (indices 0..) at scale 1 unless named, then those named, each checked
        against the model and loaded in the runner the first time (kept until unload)."""
        scales = {i: 1.0 for i in range(len(self._own))}
        for name, scale in lora or ():
            found = loras.resolve(name, self._own, self._loras_dir)
            index = self._own.index(found.path) if found.own else await self._load_lora(found)
            scales[index] = scale
        return sorted((i, s) for i, s in scales.items() if s != 0)

    @property
    def _loras_dir(self) -> Path | None:
        return Path(self.options.loras_dir) if self.options.loras_dir is not None else None

    async def _load_lora(self, found: loras.Adapter) -> int:
        async with self._loading:  # two requests naming a new adapter load it once
            loaded = self._loras.get(found.identity)
            if loaded is not None:
                return loaded[1]
            base = [self.path, *map(Path, self.options.splits)]
            await asyncio.to_thread(loras.check, found, base)
            index: int = await self._call("load_adapter", str(found.path))
            self._loras[found.identity] = (found, index)
            if self.plan is not None:  # llama.cpp keeps its tensors beside the weights
                self.plan = dataclasses.replace(self.plan, weights=self.plan.weights + found.size)
            log.info("model %s: LoRA adapter %s loaded (%s)", self.name, found.name, found.path)
            return index

    def lora_files(self, names: Sequence[str]) -> list[tuple[str, int, int] | None]:
        out: list[tuple[str, int, int] | None] = []
        for name in names:
            try:
                out.append(loras.resolve(name, self._own, self._loras_dir).identity)
            except (InvalidRequest, OSError):
                out.append(None)
        return out

    def adapters(self) -> list[dict[str, Any]]:
        """The adapters loaded over the model: its own, then those requests named."""
        own = [
            {"name": loras.own_name(p), "size": p.stat().st_size, "own": True}
            for p in self._own
            if p.exists()
        ]
        named = [{"name": a.name, "size": a.size, "own": False} for a, _ in self._loras.values()]
        return own + named

    def stats(self) -> dict[str, int | float]:
        """The engine's counters as of its last report (at most 0.25 s old)."""
        return dict(self._stats)

    @property
    def busy(self) -> bool:
        return bool(self._queues)

    def expires_at(self) -> float | None:
        """Wall-clock time this model unloads if nothing uses it; None = never."""
        return process.expires_at(self.keep_alive, self.busy, self.last_active)

    def abort(self, reason: str) -> None:
        """End every running and queued request now with a 503 `reason` (the server is shutting
        down), in each one's own stream; no new ones start."""
        self._aborted = reason
        for rid, q in self._queues.items():
            if self.alive:
                self._writer.write(ipc.encode((ipc.CANCEL, rid)))
            q.put(Delta(rid, -1, finish="error", error=Overloaded(reason)))
        self._queues.clear()

    async def close(self) -> None:
        """Stop the runner: running requests end as cancelled; killed if it does not exit."""
        self._closing = True
        self._watch.cancel()  # rather than wait for its next tick
        await process.stop(self.name, self._proc, self._writer, self.alive, self._tasks)
        self._close_deltas()


def _estimate(spec: LoadSpec) -> Plan:
    """The memory plan from the GGUF header (every header is checked before llama.cpp ever
    opens a file), LoRA adapters and a vision projector on top."""
    header = gguf.read_model(spec.files or (spec.path,))
    o = spec.options
    plan = planner.estimate(
        header, ctx_size=o.ctx_size, parallel=o.parallel, batch_size=o.batch_size,
        gpus=probe.gpus(), gpu_layers=o.gpu_layers,
    )  # fmt: skip
    # llama.cpp keeps each adapter's tensors beside the model
    extra = sum(p.stat().st_size for p in spec.adapters)
    if extra:
        plan = dataclasses.replace(plan, weights=plan.weights + extra)
    if spec.projector is not None:
        projector = mmproj.read(spec.projector)
        plan = planner.with_projector(plan, projector.weights, projector.compute)
    if o.draft_path is not None:  # its weights, KV cache and buffers beside the model's
        draft = planner.estimate(
            gguf.read_model((Path(o.draft_path), *map(Path, o.draft_splits))),
            ctx_size=o.ctx_size, parallel=o.parallel, batch_size=o.batch_size,
            gpus=probe.gpus(), gpu_layers=o.gpu_layers,
        )  # fmt: skip
        plan = dataclasses.replace(
            plan, weights=plan.weights + draft.weights, kv=plan.kv + draft.kv,
            compute=plan.compute + draft.compute, output=plan.output + draft.output,
            vram=plan.vram + draft.vram,
        )  # fmt: skip
    return plan


async def _load(spec: LoadSpec) -> RunnerClient:
    """Start a runner with the plan's GPU layers (spread over several GPUs by free memory)."""
    o = dataclasses.replace(
        spec.options,
        splits=tuple(map(str, spec.files[1:])),
        adapters=tuple(map(str, spec.adapters)),
        projector=str(spec.projector) if spec.projector is not None else None,
    )
    plan = spec.plan
    if plan is not None:
        if o.gpu_layers < 0:
            o = dataclasses.replace(o, gpu_layers=plan.gpu_layers)
        if plan.split:
            o = dataclasses.replace(o, tensor_split=plan.split)
    model = await RunnerClient.load(spec.name, spec.path, o, spec.observer)
    model.plan = plan
    model.modelfile = spec.modelfile
    return model


_CAPABILITIES = ("completion", "chat", "embedding", "tools", "insert", "thinking", "vision")

MANIFEST = Manifest(
    name="llama.cpp",
    version=llama_cpp_version(),
    abi=ABI_VERSION,
    formats=("gguf",),
    architectures=ARCHITECTURES,
    capabilities=frozenset(Capability(c) for c in _CAPABILITIES),
    load=_load,
    estimate=_estimate,
)
"""The built-in engine: GGUF models on llama.cpp, each in its own runner process."""
