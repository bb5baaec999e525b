"""`POST /v1/responses`: OpenAI's Responses API over the same chat pipeline.

Input (text or items) becomes chat messages; output is a message item or function-call items.
Streaming sends the Responses event sequence: response.created, response.in_progress,
output_item.added, content_part.added, output_text.delta..., output_text.done,
content_part.done, output_item.done, response.completed.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from typing import Annotated, Any, Literal

import orjson
from aiohttp import web
from pydantic import Field, field_validator, model_validator

from xllm import _core, grammar, tools
from xllm.engine.protocol import Delta, Image, Request, Sampling
from xllm.errors import InvalidRequest, XllmError
from xllm.images import Source
from xllm.server import pump
from xllm.server.http import (
    json_response,
    load_model,
    parse_body,
    peer_gone,
    read_images,
    start_generation,
)
from xllm.server.openai.wire import EngineName, JSONSchema, LoraFields, ResponseFormat, Wire
from xllm.server.pump import Usage


class InputPart(Wire):
    type: Literal["input_text", "output_text", "input_image", "input_file"]
    text: str = ""
    image_url: str | None = None
    """An `input_image`'s image: a data: URI, base64, or a URL."""
    file_id: str | None = None
    detail: Literal["low", "high", "auto"] | None = None

    @model_validator(mode="after")
    def _image_given(self) -> InputPart:
        if self.type == "input_file":
            raise ValueError("input_file: files are not supported; send text or input_image")
        if self.type == "input_image" and self.image_url is None:
            raise ValueError(
                "an input_image needs image_url (files are not stored here, so file_id is not "
                "taken)"
            )
        return self


class InputItem(Wire):
    type: Literal["message", "function_call", "function_call_output"] = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[InputPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> InputItem:
        if self.type == "message" and (self.role is None or self.content is None):
            raise ValueError("a message item needs role and content")
        if self.type == "function_call" and not (self.call_id and self.name):
            raise ValueError("a function_call item needs call_id and name")
        if self.type == "function_call_output" and self.call_id is None:
            raise ValueError("a function_call_output item needs call_id")
        return self


class FunctionTool(Wire):
    type: Literal["function"]
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: JSONSchema | None = None
    strict: bool | None = None


class NamedFunction(Wire):
    type: Literal["function"]
    name: str


class TextConfig(Wire):
    format: dict[str, Any] | None = None

    @field_validator("format")
    @classmethod
    def _satisfiable(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v is not None and v.get("type") == "json_schema":
            grammar.check_schema(v.get("schema"), "schema.")
        return v


class ResponsesRequest(LoraFields):
    model: Annotated[str, Field(min_length=1, max_length=400)]
    engine: EngineName | None = None
    cache: bool = True
    """False: neither answered from nor stored in the temperature-0 response cache."""
    input: Annotated[str, Field(min_length=1)] | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedFunction | None = None
    parallel_tool_calls: bool = True
    stream: bool = False
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(ge=0.0, le=1.0)] | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    user: str | None = None

    def image_sources(self) -> list[Source]:
        """The input's images, in order, named by their field."""
        if isinstance(self.input, str):
            return []
        return [
            Source(f"input[{i}].content[{j}].image_url", p.image_url)
            for i, item in enumerate(self.input)
            if isinstance(item.content, list)
            for j, p in enumerate(item.content)
            if p.image_url is not None and p.type == "input_image"
        ]

    def messages(self, images: list[Image]) -> list[dict[str, Any]]:
        """The input as chat messages, each with its share of `images` (decoded from
        `image_sources`, in order)."""
        decoded = iter(images)
        out: list[dict[str, Any]] = []
        if self.instructions:
            out.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            return [*out, {"role": "user", "content": self.input}]
        for item in self.input:
            if item.type == "function_call":
                call = {"name": item.name, "arguments": item.arguments or "{}"}
                out.append(
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": item.call_id, "type": "function", "function": call}],
                    }
                )
            elif item.type == "function_call_output":
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": item.output})
            elif isinstance(item.content, list):
                text = "".join(p.text for p in item.content if p.type != "input_image")
                mine = [next(decoded) for p in item.content if p.type == "input_image"]
                out.append(
                    {"role": item.role, "content": text, **({"images": mine} if mine else {})}
                )
            else:
                out.append({"role": item.role, "content": item.content})
        return out

    def functions(self) -> list[dict[str, Any]]:
        if not self.tools or self.tool_choice == "none":
            return []
        return [t.model_dump(exclude_none=True, exclude={"type", "strict"}) for t in self.tools]

    def forced(self) -> str | None:
        if isinstance(self.tool_choice, NamedFunction):
            return self.tool_choice.name
        return "" if self.tool_choice == "required" else None


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "input_tokens": u.prompt_tokens,
        "input_tokens_details": {"cached_tokens": u.cached_tokens},
        "output_tokens": u.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.total_tokens,
    }


async def responses(request: web.Request) -> web.StreamResponse:
    body = await parse_body(request, ResponsesRequest)
    if body.previous_response_id:
        raise InvalidRequest(
            "previous_response_id: responses are not stored; send the whole conversation",
            param="previous_response_id",
        )
    model = await load_model(request, body.model, engine=body.engine)
    images = await read_images(request, model, body.image_sources())
    constraint = None
    if body.text and body.text.format and body.text.format.get("type") != "text":
        fmt = dict(body.text.format)
        wrapped = (
            {"type": "json_schema", "json_schema": {"schema": fmt.get("schema") or {}}}
            if fmt.get("type") == "json_schema"
            else {"type": fmt.get("type")}
        )
        try:
            grammar_format = ResponseFormat.model_validate(wrapped).grammar_format()
        except ValueError:
            raise InvalidRequest("text.format: unsupported format", param="text.format") from None
        constraint = grammar.for_format(grammar_format, "text.format")
    functions = body.functions()
    sampling = Sampling(
        temperature=body.temperature,
        top_p=body.top_p,
        max_tokens=body.max_output_tokens,
        grammar=constraint,
        lora=body.loras(),
    )
    gen = await start_generation(
        request,
        model,
        Request(
            messages=body.messages(images),
            sampling=sampling,
            tools=functions,
            forced_tool=body.forced(),
            parallel_tools=body.parallel_tool_calls,
            param="input",
        ),
        cache=body.cache,
    )
    head: dict[str, Any] = {
        "id": f"resp_{secrets.token_hex(12)}",
        "object": "response",
        "created_at": int(time.time()),
        "model": body.model,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or []],
        "tool_choice": body.tool_choice
        if isinstance(body.tool_choice, str)
        else (body.tool_choice.model_dump() if body.tool_choice else "auto"),
        "parallel_tool_calls": body.parallel_tool_calls,
        "error": None,
        "incomplete_details": None,
        "metadata": {},
    }
    names = {f["name"] for f in functions}
    if body.stream:
        sink = _Events(_Writer(head), names, body.forced() is not None)
        return await pump.stream(request, gen, sink)
    result = await pump.collect(gen, lambda: peer_gone(request))
    choice = result.choices[0]
    text, calls = tools.parse(choice.text, names) if names else (choice.text, [])
    calls += tools.native(choice.tool_calls)  # an engine's own calls (a remote upstream's)
    writer = _Writer(head)
    writer.end(text, calls)  # the events go nowhere: the items they make are the output
    return json_response(writer.final(result.usage, choice.finish_reason))


def _final(
    head: dict[str, Any], output: list[dict[str, Any]], usage: Usage, finish: str | None
) -> dict[str, Any]:
    incomplete = finish == "length"
    return {
        **head,
        "status": "incomplete" if incomplete else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
        "output": output,
        "usage": _usage(usage),
    }


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class _Writer:
    """The Responses event sequence, item by item, numbered as the stream requires.

    Each item opens (output_item.added), grows by deltas (output_text or
    function_call_arguments), and closes (the matching .done events, output_item.done); the
    closed items are the response's `output`.
    """

    def __init__(self, head: dict[str, Any]) -> None:
        self.head = head
        self.n = 0
        self.output: list[dict[str, Any]] = []
        self.item: dict[str, Any] | None = None
        self.text = ""

    def event(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.n, **data}
        self.n += 1
        return _core.sse_event(orjson.dumps(payload).decode(), kind)

    def opening(self) -> bytes:
        now = {**self.head, "status": "in_progress", "output": [], "usage": None}
        return self.event("response.created", response=now) + self.event(
            "response.in_progress", response=now
        )

    def _where(self) -> dict[str, Any]:
        assert self.item is not None
        return {"item_id": self.item["id"], "output_index": len(self.output)}

    def open_message(self) -> bytes:
        self.item = {
            "type": "message",
            "id": f"msg_{secrets.token_hex(12)}",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        self.text = ""
        added = self.event(
            "response.output_item.added", output_index=len(self.output), item=self.item
        )
        return added + self.event(
            "response.content_part.added", **self._where(), content_index=0, part=_text_part("")
        )

    def open_call(self, name: str, call_id: str | None = None) -> bytes:
        self.item = {
            "type": "function_call",
            "id": f"fc_{secrets.token_hex(12)}",
            "call_id": call_id or f"call_{secrets.token_hex(12)}",
            "name": name,
            "arguments": "",
            "status": "in_progress",
        }
        return self.event(
            "response.output_item.added", output_index=len(self.output), item=dict(self.item)
        )

    def delta(self, text: str) -> bytes:
        assert self.item is not None
        if not text:
            return b""
        if self.item["type"] == "message":
            self.text += text
            return self.event(
                "response.output_text.delta",
                **self._where(),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        self.item["arguments"] += text
        return self.event("response.function_call_arguments.delta", **self._where(), delta=text)

    def close(self) -> bytes:
        item, where = self.item, self._where()
        assert item is not None
        if item["type"] == "message":
            part = _text_part(self.text)
            item = {**item, "status": "completed", "content": [part]}
            out = self.event(
                "response.output_text.done", **where, content_index=0, text=self.text, logprobs=[]
            )
            out += self.event("response.content_part.done", **where, content_index=0, part=part)
        else:
            item = {**item, "status": "completed"}
            out = self.event(
                "response.function_call_arguments.done",
                **where,
                name=item["name"],
                arguments=item["arguments"],
            )
        out += self.event("response.output_item.done", output_index=len(self.output), item=item)
        self.output.append(item)
        self.item = None
        return out

    def message_text(self, text: str) -> bytes:
        """Answer text: the message item opens with its first piece."""
        if not text:
            return b""
        return (self.open_message() if self.item is None else b"") + self.delta(text)

    def end(self, text: str, calls: Sequence[tools.ToolCall]) -> bytes:
        """The end of the answer: its last text, then each call as an item of its own (with
        neither, an empty message, so that the output is never empty)."""
        out = self.message_text(text)
        if self.item is None and not self.output and not calls:
            out += self.open_message()
        out += self.close() if self.item else b""
        for call in calls:
            args = orjson.dumps(call.arguments).decode()
            out += self.open_call(call.name, call.id) + self.delta(args) + self.close()
        return out

    def final(self, usage: Usage, finish: str | None) -> dict[str, Any]:
        return _final(self.head, self.output, usage, finish)

    def completed(self, usage: Usage, finish: str | None) -> bytes:
        return self.event("response.completed", response=self.final(usage, finish))


class _Events:
    """The Responses stream (a `pump.Sink`): text as output_text deltas, or forced calls as
    function_call_arguments deltas; with calls the model is free to make, text as it comes but
    for what may be a call (held back, then sent as function_call items)."""

    content_type = "text/event-stream"

    def __init__(self, writer: _Writer, names: set[str], forced: bool) -> None:
        self.writer = writer
        self.parser = tools.CallStream() if forced else None
        self.watch = tools.CallWatch(names) if names and not forced else None
        self.native: list[tools.ToolCall] = []
        self.finish: str | None = None

    def opening(self) -> bytes:
        return self.writer.opening()

    def delta(self, d: Delta) -> bytes:
        writer = self.writer
        if d.tool_calls:  # an engine's own calls: whole, at the end of the answer
            self.native += tools.native(d.tool_calls)
        if self.parser is None:
            return writer.message_text(self.watch.feed(d.text) if self.watch else d.text)
        out = b""
        for kind, value in self.parser.feed(d.text):
            if kind == "call":
                out += (writer.close() if writer.item else b"") + writer.open_call(value)
            else:
                out += writer.delta(value)
        return out

    async def finished(self, d: Delta, usage: Usage, running: int) -> bytes:
        self.finish = d.finish
        return b""

    async def closing(self, usage: Usage) -> bytes:
        text, calls = self.watch.end() if self.watch else ("", [])
        out = self.writer.end(text, calls + self.native)
        return out + self.writer.completed(usage, self.finish)

    def error(self, e: XllmError) -> bytes:
        err = {"code": e.code or e.type, "message": e.message, "param": e.param}
        return self.writer.event("error", **err)
