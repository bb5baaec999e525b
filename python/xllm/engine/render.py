"""The render worker: a child of a model's runner that renders the model's chat templates
(`xllm render`, not for users).

A template is code from a model file or from a request. Rendered in the runner, a runaway one
could only be stopped by killing the runner, and with it every stream on the model. Here it runs
in a small process of its own, under a wall-clock limit and a memory cap; a worker past its
limit is killed and replaced, and only the offending request fails (a 400). The runner keeps
tokenizing: the worker sends back the prompt text.

One worker per runner rather than a pool per server: templates are the model's own business, a
hostile template of one model never delays another model's prompts, and the worker lives and
dies with its runner, so the server has no further processes to manage. Renders on one model
take turns; a normal one takes well under a millisecond, a hostile one holds the worker for at
most RENDER_TIMEOUT_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from xllm.engine import ipc
from xllm.engine.options import child_command
from xllm.errors import XllmError
from xllm.models.template import TemplateError, build_prompt

RENDER_TIMEOUT_S = 2.0
"""A render still running after this long is stopped (its worker killed and replaced)."""
BOOT_TIMEOUT_S = 60.0
"""A worker not ready this long after its start is broken: its request fails as a server error.
(The render limit starts once it is ready, so a slow boot on a busy machine fails no template.)"""
MEMORY_HEADROOM = 256 << 20
"""How far a worker may grow past its size at start: values a template builds (not its output,
which template.py caps at 1 MiB) end in a MemoryError there, not in the machine's memory."""
_CLOSE_S = 1.0


class RenderWorker:
    """The runner's handle on its render worker; `prompt` is `build_prompt` in that process."""

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._booted = False
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        """Start the worker now, so that the first chat request does not wait for it."""
        async with self._lock:
            await self._restart()

    async def booted(self) -> None:
        """Wait until the worker has started (RuntimeError if it did not: the next prompt
        starts another)."""
        async with self._lock:
            await self._ready()

    async def prompt(
        self,
        chat_template: str | None,
        messages: Sequence[Mapping[str, Any]],
        *,
        bos_token: str,
        eos_token: str,
        tools: Sequence[Mapping[str, Any]] | None,
        enable_thinking: bool | None,
    ) -> tuple[str, list[str]]:
        """(prompt text, extra stop strings); TemplateError for a template that fails, runs
        past RENDER_TIMEOUT_S or outgrows the worker's memory."""
        request = {
            "chat_template": chat_template,
            "messages": messages,
            "bos_token": bos_token,
            "eos_token": eos_token,
            "tools": tools,
            "enable_thinking": enable_thinking,
        }
        failure = "the template renderer stopped"
        async with self._lock:
            proc = await self._ready()
            try:
                async with asyncio.timeout(RENDER_TIMEOUT_S):
                    reply = await _exchange(proc, request)
            except TimeoutError:
                reply = None
                failure = f"rendering took longer than {RENDER_TIMEOUT_S:g} s"
            except ConnectionError:
                reply = None
            except BaseException:  # cancelled mid-exchange: its reply would go to the next one
                await self._restart()
                raise
            if reply is None:
                await self._restart()
        if reply is None:
            raise TemplateError(f"chat template error: {failure}")
        error, value = reply
        if error is not None:
            raise TemplateError(error)
        text, stops = value
        return str(text), list(stops)

    async def _ready(self) -> asyncio.subprocess.Process:
        """The worker, (re)started if need be and once it has said it is ready."""
        if self._proc is None or self._proc.returncode is not None:
            await self._restart()
        assert self._proc is not None and self._proc.stdout is not None
        if not self._booted:
            try:
                hello = await asyncio.wait_for(ipc.read(self._proc.stdout), BOOT_TIMEOUT_S)
            except TimeoutError:
                hello = None
            if hello != (ipc.READY,):
                await self._stop(kill=True)
                raise RuntimeError("the chat template renderer did not start (see the log)")
            self._booted = True
        return self._proc

    async def _restart(self) -> None:
        """Kill the worker (if any) and start a fresh one, which boots while the runner goes
        on with other work."""
        await self._stop(kill=True)
        self._booted = False
        self._proc = await asyncio.create_subprocess_exec(
            *child_command("render"),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )

    async def _stop(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        elif proc.stdin is not None:
            proc.stdin.close()  # end of input: the worker exits by itself
        try:
            await asyncio.wait_for(proc.wait(), _CLOSE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        async with self._lock:
            await self._stop(kill=False)


async def _exchange(
    proc: asyncio.subprocess.Process, request: dict[str, Any]
) -> tuple[Any, ...] | None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(ipc.encode((request,)))
    await proc.stdin.drain()
    return await ipc.read(proc.stdout)


def main() -> int:
    """The worker: says it is ready, then renders requests from stdin, with (error, (text,
    stops)) replies to stdout."""
    ipc.die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; the runner decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _cap_memory()
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    sink.write(ipc.encode((ipc.READY,)))
    sink.flush()
    while (message := ipc.read_blocking(source)) is not None:
        try:
            reply: tuple[Any, ...] = (None, build_prompt(**message[0]))
        except XllmError as e:
            reply = (e.message, None)
        sink.write(ipc.encode(reply))
        sink.flush()
    return 0


def _cap_memory() -> None:
    """Limit the address space to what the worker has now plus MEMORY_HEADROOM (where the
    kernel says what that is: Linux; elsewhere the time limit alone applies)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[0])
    except OSError:
        return
    limit = pages * os.sysconf("SC_PAGE_SIZE") + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
