"""The runner: a child process that hosts one model's engine (`xllm runner`, not for users).

A crash or hang of llama.cpp then takes down this process only; the server fails that model's
requests with a clear error and reloads it on the next request. The runner exits when the
server goes away (socket closed, or the parent-death signal on Linux).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

from xllm.engine import ipc
from xllm.engine.llamacpp import LlamaCppEngine
from xllm.engine.options import EngineOptions
from xllm.engine.protocol import Image
from xllm.engine.render import RenderWorker
from xllm.errors import InvalidRequest
from xllm.models.metadata import ModelInfo

log = logging.getLogger("xllm.runner")

BEAT_S = 0.25
"""How often the runner reports its counters (the server's stats and watchdog read them)."""


def main(fd: int, deltas_fd: int, name: str, path: Path, options_json: str) -> int:
    """Serve the model at `path` to the server at the other end of socket `fd`; the batching
    loop sends its deltas on `deltas_fd` (a `SOCK_SEQPACKET` socket) itself."""
    ipc.die_with_parent()
    # Ctrl-C in a terminal reaches the whole process group; the server decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options = EngineOptions.from_json(options_json)
    import uvloop

    uvloop.run(_serve(socket.socket(fileno=fd), deltas_fd, name, path, options))
    return 0


async def _serve(
    sock: socket.socket, deltas_fd: int, name: str, path: Path, options: EngineOptions
) -> None:
    reader, writer = await asyncio.open_connection(sock=sock)
    # The render worker (a Python process) boots while the model loads, not beside the first
    # request: its start-up took ~80 ms of CPU from that request's prefill on 2 cores.
    renderer = RenderWorker()
    await renderer.start()
    try:
        engine = await asyncio.to_thread(LlamaCppEngine, path, options)
        engine.send_to(deltas_fd)
        info = ModelInfo.from_engine(name, path, engine)
        if options.chat_template is not None:  # a Modelfile TEMPLATE wins over the GGUF's
            info = dataclasses.replace(info, chat_template=options.chat_template)
        if engine.vision:
            info = dataclasses.replace(info, image_marker=engine.image_marker)
        if options.draft_path is not None:
            draft = options.draft_model or options.draft_path
            info = dataclasses.replace(info, draft=draft, draft_size=engine.draft_size)
    except (ValueError, RuntimeError, OSError) as e:
        writer.write(ipc.encode((ipc.FAILED, str(e))))
        await writer.drain()
        await renderer.close()
        return
    finally:
        os.close(deltas_fd)  # the engine keeps its own copy
    try:
        await renderer.booted()
    except RuntimeError as e:  # chat requests start another; the model serves meanwhile
        log.warning("%s", e)
    writer.write(ipc.encode((ipc.READY, info)))
    beat = asyncio.create_task(_beat(engine, writer))
    calls: set[asyncio.Task[None]] = set()
    try:
        while (msg := await ipc.read(reader)) is not None:
            op = msg[0]
            if op == ipc.SUBMIT:
                _, cid, rid, prompt, params = msg
                writer.write(ipc.encode(_submit(engine, cid, rid, prompt, params)))
            elif op == ipc.CANCEL:
                engine.cancel(msg[1])
            elif op == ipc.CALL:
                call = _call(engine, info, renderer, writer, msg[1], msg[2], msg[3])
                task = asyncio.create_task(call)
                calls.add(task)
                task.add_done_callback(calls.discard)
            elif op == ipc.CLOSE:
                break
    finally:
        beat.cancel()
        await asyncio.to_thread(engine.close)  # the cancellations it makes go out as deltas
        await renderer.close()
        writer.close()


def _submit(
    engine: LlamaCppEngine,
    cid: int,
    rid: int,
    prompt: list[int],
    params: dict[str, Any],
) -> tuple[Any, ...]:
    images: list[tuple[int, int, Image]] = params.pop("images", [])
    try:
        engine.submit(
            rid,
            prompt,
            params,
            [(start, n, im.digest, im.width, im.height, im.rgb) for start, n, im in images],
        )
    except Exception as e:  # every failure reaches the server, which waits for this reply
        return (ipc.REPLY, cid, ipc.wire_error(e), None)
    return (ipc.REPLY, cid, None, None)


async def _call(
    engine: LlamaCppEngine,
    info: ModelInfo,
    renderer: RenderWorker,
    writer: asyncio.StreamWriter,
    cid: int,
    method: str,
    args: tuple[Any, ...],
) -> None:
    try:
        if method == "embed":
            value: Any = await asyncio.to_thread(engine.embed, *args)
        elif method == "tokenize":
            value = engine.tokenize(*args)
        elif method == "detokenize":
            value = engine.detokenize(*args)
        elif method == "grammar_parses":
            value = engine.grammar_parses(*args)
        elif method == "load_adapter":
            value = await asyncio.to_thread(engine.load_adapter, *args)
        elif method == "chat_prompt":
            value = await _chat_prompt(engine, info, renderer, *args)
        elif method == "tokenize_media":
            value = await _tokenize_media(engine, *args)
        else:
            raise RuntimeError(f"unknown runner call {method!r}")
        reply: tuple[Any, ...] = (ipc.REPLY, cid, None, value)
    except Exception as e:  # every failure reaches the server, which waits for this reply
        reply = (ipc.REPLY, cid, ipc.wire_error(e), None)
    writer.write(ipc.encode(reply))


async def _chat_prompt(
    engine: LlamaCppEngine,
    info: ModelInfo,
    renderer: RenderWorker,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    template: str | None = None,
    enable_thinking: bool | None = None,
    images: list[Image] | None = None,
) -> tuple[list[int], list[str], list[tuple[int, int]]]:
    """Rendered by the render worker, tokenized here; `template` (a request's own, Jinja2)
    replaces the model's chat template. With `images`, the text's image markers stand for
    them: (tokens, stops, each image's (start, length))."""
    text, stops = await renderer.prompt(
        template if template is not None else info.chat_template,
        messages,
        bos_token=info.bos_text,
        eos_token=info.eos_text,
        tools=tools,
        enable_thinking=enable_thinking,
    )
    if images:
        tokens, spans = await _tokenize_media(engine, text, images, "messages")
        return tokens, stops, spans
    return engine.tokenize(text, True, True), stops, []


async def _tokenize_media(
    engine: LlamaCppEngine, text: str, images: list[Image], param: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """libmtmd preprocesses the images while tokenizing: off the runner's event loop."""
    if not engine.vision:
        raise InvalidRequest(f"{param}: this model takes no images", param=param)
    try:
        return await asyncio.to_thread(
            engine.tokenize_media,
            text,
            [(im.width, im.height, im.rgb, im.digest) for im in images],
        )
    except ValueError as e:
        raise InvalidRequest(f"{param}: {e}", param=param) from None


async def _beat(engine: LlamaCppEngine, writer: asyncio.StreamWriter) -> None:
    while True:
        writer.write(ipc.encode((ipc.BEAT, engine.stats())))
        await asyncio.sleep(BEAT_S)
