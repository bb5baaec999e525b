"""The remote engine: a model another server serves (an OpenAI-compatible upstream, see
`engine/upstream.py`), loaded by the scheduler like any model but costing no local memory.

Two ways through it:

- the seam's `generate(Request)`: the request becomes an OpenAI chat (or text) completion,
  streamed from the upstream, whose chunks become Deltas (text, native tool calls, usage). This
  is how Ollama's `/api/chat`, `/api/generate` and OpenAI's Responses run over a remote model,
  whatever the upstream speaks besides `/v1/chat/completions`.
- `Relay`, the OpenAI dialect's fast path (`server/relay.py`): chat and text completions and
  embeddings go upstream as the client sent them (the model's upstream name in, the Modelfile's
  defaults filled in where the client left a field out), and the answer (an SSE stream
  included) comes back as it arrives, the upstream name rewritten to the local one. Every field
  the upstream knows (n, logprobs, tools, response_format, its own extras) works without xllm
  translating it, and a proxied token costs one pass over its bytes.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import aiohttp
import orjson

from xllm import __version__, reasoning
from xllm.engine.llama_prompt import modelfile_defaults, with_modelfile
from xllm.engine.plugins import LoadSpec, Manifest
from xllm.engine.protocol import ABI_VERSION, Capability, Delta, Request, Sampling
from xllm.engine.upstream import MAX_BODY, Call, Target, read_body, upstream_message
from xllm.errors import InvalidRequest, Overloaded, UpstreamError
from xllm.memory.planner import Plan
from xllm.models.metadata import ModelInfo

KIND = "remote"
NO_MEMORY = Plan(weights=0, kv=0, compute=0, output=0, layers=0, gpu_layers=0, vram=0)
DEFAULT_CAPABILITIES = frozenset({Capability.COMPLETION, Capability.CHAT, Capability.TOOLS})
"""What an upstream that does not list its models' capabilities (vLLM, OpenAI) is taken to
offer; embeddings and images still go through, and the upstream says if it cannot."""
_EXTENSIONS = frozenset(
    [
        "engine",
        "cache",
        "speculative",
        "lora",
        "scale",
        "top_k",
        "min_p",
        "ignore_eos",
        "repeat_penalty",
        "repeat_last_n",
        "chat_template",
        "chat_template_kwargs",
        "reasoning_format",
    ]
)
"""The fields xllm's OpenAI dialect adds to OpenAI's own."""
_TAKEN: dict[str, frozenset[str]] = {
    "openai": frozenset(),
    "vllm": frozenset(["top_k", "min_p", "ignore_eos", "chat_template", "chat_template_kwargs"]),
    "llama-server": frozenset(
        [
            "top_k",
            "min_p",
            "ignore_eos",
            "repeat_penalty",
            "repeat_last_n",
            "reasoning_format",
            "chat_template_kwargs",
        ]
    ),
    "xllm": _EXTENSIONS - {"engine"},  # `engine` chose this front's engine, not the upstream's
}
"""Which of those each flavour of upstream takes (OpenAI's own API refuses unknown fields; the
rest are dropped from a relayed body)."""


def relayed_fields(body: Mapping[str, Any], flavour: str) -> dict[str, Any]:
    """An OpenAI body as the upstream takes it: OpenAI's fields, and of xllm's those the
    upstream's flavour knows (the repetition penalty under vLLM's name)."""
    out = dict(body)
    if flavour == "vllm" and "repeat_penalty" in out:
        out["repetition_penalty"] = out.pop("repeat_penalty")
    taken = _TAKEN.get(flavour, frozenset())
    return {k: v for k, v in out.items() if k not in _EXTENSIONS or k in taken}


def context_length(target: Target) -> int:
    """The upstream model's context: vLLM's `max_model_len`, llama-server's `n_ctx_train`
    (0: not said)."""
    entry = target.pool.models.get(target.model) or {}
    value = entry.get("max_model_len") or (entry.get("meta") or {}).get("n_ctx_train")
    return value if isinstance(value, int) and value > 0 else 0


def capabilities(target: Target) -> frozenset[Capability]:
    """The upstream model's capabilities where it lists them (xllm does), else the default."""
    listed = (target.pool.models.get(target.model) or {}).get("capabilities")
    if not isinstance(listed, list):
        return DEFAULT_CAPABILITIES
    known = {c.value for c in Capability}
    return frozenset(Capability(c) for c in listed if c in known)


def sampling_fields(s: Sampling, flavour: str) -> dict[str, Any]:
    """Sampling parameters as OpenAI's fields; knobs OpenAI's own API lacks (top_k, min_p, the
    repetition penalty) go to upstreams that take them."""
    out: dict[str, Any] = {}
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        if getattr(s, name) is not None:
            out[name] = getattr(s, name)
    if s.seed is not None and s.seed >= 0:
        out["seed"] = s.seed
    if s.stop:
        out["stop"] = list(s.stop)
    if s.max_tokens:
        out["max_tokens"] = s.max_tokens
    if s.n != 1:
        out["n"] = s.n
    if s.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}
    if flavour == "openai":
        return out
    for name in ("top_k", "min_p", "ignore_eos"):
        if getattr(s, name) is not None:
            out[name] = getattr(s, name)
    if s.repeat_penalty is not None:
        out["repetition_penalty" if flavour == "vllm" else "repeat_penalty"] = s.repeat_penalty
    return out


class RemoteEngine:
    """One remote model, as the scheduler and the handlers see it."""

    kind = KIND

    def __init__(self, spec: LoadSpec, target: Target) -> None:
        self.name = spec.name
        self.key = spec.key
        self.target = target
        self.flavour = target.pool.endpoint.flavour
        self.modelfile = spec.modelfile
        self.ctx_size = context_length(target)
        """The upstream's, as its health checks list it (0: not said); kept up to date."""
        self.info = ModelInfo(
            name=spec.name, path=spec.path, architecture=KIND, context_length=0,
            embedding_length=0, block_count=0, parameter_count=0, size=0, quantization=KIND,
            chat_template=None,
        )  # fmt: skip
        self.plan: Plan | None = NO_MEMORY
        self.keep_alive = spec.options.keep_alive_s
        self.last_active = time.monotonic()
        self.on_exit: Callable[[Any], None] | None = None
        self.requests = 0
        self._running: set[RemoteGeneration | Call] = set()
        self._aborted: str | None = None

    @property
    def capabilities(self) -> frozenset[Capability]:
        return capabilities(self.target)

    @property
    def pid(self) -> int | None:
        return None

    @property
    def busy(self) -> bool:
        return bool(self._running)

    def stats(self) -> dict[str, int | float]:
        return {"requests_total": self.requests, "running": len(self._running), "queue_depth": 0}

    def expires_at(self) -> float | None:
        if self.keep_alive < 0:
            return None
        return time.time() + self.keep_alive - (time.monotonic() - self.last_active)

    def abort(self, reason: str) -> None:
        self._aborted = reason
        for running in list(self._running):
            running.close()

    async def close(self) -> None:
        self.abort("the model was unloaded")
        if self.on_exit is not None:
            self.on_exit(self)

    async def _open(self, path: str, body: dict[str, Any]) -> Call:
        if self._aborted is not None:
            raise Overloaded(self._aborted)
        self.requests += 1
        self.last_active = time.monotonic()
        self.ctx_size = context_length(self.target) or self.ctx_size
        return await self.target.pool.open(path, body)

    def _done(self, running: RemoteGeneration | Call) -> None:
        self._running.discard(running)
        self.last_active = time.monotonic()

    # --- the seam ----------------------------------------------------------------------------

    async def generate(self, request: Request) -> RemoteGeneration:
        """The request as an OpenAI chat (or, for a prompt, text) completion, sent now: the
        upstream's refusal (a 400, a 503 with no upstream up) is raised here."""
        if request.context:
            raise InvalidRequest(
                "context: a remote model takes no context tokens; send the conversation with "
                "/api/chat",
                param="context",
            )
        sampling = request.sampling.over(modelfile_defaults(self.modelfile)).over(request.defaults)
        body: dict[str, Any] = {"model": self.target.model, "stream": True}
        body.update(sampling_fields(sampling, self.flavour))
        body["stream_options"] = {"include_usage": True}
        if sampling.grammar is not None and sampling.grammar.source is not None:
            body["response_format"] = response_format(sampling.grammar.source)
        if request.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = openai_messages(
                with_modelfile(self.modelfile, request.messages), request.param
            )
            if request.tools:
                body["tools"] = [{"type": "function", "function": dict(f)} for f in request.tools]
                body["parallel_tool_calls"] = request.parallel_tools
            if request.forced_tool is not None:
                body["tool_choice"] = (
                    {"type": "function", "function": {"name": request.forced_tool}}
                    if request.forced_tool
                    else "required"
                )
            if request.enable_thinking is not None and self.flavour in ("vllm", "llama-server"):
                body["chat_template_kwargs"] = {"enable_thinking": request.enable_thinking}
        else:
            path = "/v1/completions"
            body["prompt"] = _prompt(request)
            if request.suffix is not None:
                body["suffix"] = request.suffix
        call = await self._open(path, body)
        gen = RemoteGeneration(self, call, sampling.n, split=request.split_thinking)
        self._running.add(gen)
        return gen

    # --- the OpenAI fast path ----------------------------------------------------------------

    async def relay(self, path: str, body: Mapping[str, Any]) -> Relayed:
        """Send an OpenAI request as it is (upstream model name, Modelfile defaults where the
        client gave none, of xllm's own fields those the upstream's flavour takes); the answer
        comes back as it arrives."""
        if body.get("lora") is not None and "lora" not in _TAKEN.get(self.flavour, ()):
            raise InvalidRequest(
                f"lora: remote model {self.name!r} ({self.flavour}) takes no LoRA adapters "
                "from xllm (name the upstream's adapter as the model)",
                param="lora",
            )
        out = relayed_fields(body, self.flavour)
        out["model"] = self.target.model
        if path != "/v1/embeddings":
            defaults = sampling_fields(modelfile_defaults(self.modelfile), self.flavour)
            if "max_completion_tokens" in out:
                defaults.pop("max_tokens", None)
            out = {**defaults, **out}
        if isinstance(out.get("messages"), list):
            out["messages"] = with_modelfile(self.modelfile, out["messages"])
        call = await self._open(path, out)
        relayed = Relayed(self, call, self.target.model, str(body.get("model") or self.name))
        self._running.add(call)
        return relayed

    async def embed_texts(
        self, inputs: Sequence[str | Sequence[int]], *, normalize: bool
    ) -> tuple[list[list[float]], int]:
        """Vectors of texts (or token ids) from the upstream's `/v1/embeddings`, and the tokens
        it counted."""
        call = await self._open(
            "/v1/embeddings",
            {
                "model": self.target.model,
                "input": [x if isinstance(x, str) else list(x) for x in inputs],
            },
        )
        self._running.add(call)
        try:
            assert call.response is not None
            data = orjson.loads(await read_body(call.response, MAX_BODY))
        except (TimeoutError, aiohttp.ServerTimeoutError):
            call.close(failed=True)
            raise call.timeout() from None
        except (aiohttp.ClientError, OSError) as e:
            call.close(failed=True)
            raise call.broken(e) from None
        except orjson.JSONDecodeError:
            call.close(failed=True)
            raise UpstreamError(
                f"remote endpoint {self.target.pool.name!r} sent invalid JSON"
            ) from None
        finally:
            call.close()
            self._done(call)
        try:
            rows = sorted(data["data"], key=lambda r: r["index"])
            vectors = [[float(x) for x in r["embedding"]] for r in rows]
            tokens = int((data.get("usage") or {}).get("prompt_tokens", 0))
        except (KeyError, TypeError, ValueError):
            raise UpstreamError(
                f"remote endpoint {self.target.pool.name!r} sent embeddings of another shape"
            ) from None
        if normalize:
            vectors = [_unit(v) for v in vectors]
        return vectors, tokens


def _unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 0 else v


def response_format(source: str | dict[str, Any]) -> dict[str, Any]:
    """A request's JSON constraint (`format`, `text.format`) as OpenAI's response_format."""
    if source == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": source}}


def _prompt(request: Request) -> str | list[int]:
    """A completion's prompt: its text, or its token ids (OpenAI takes either, not both)."""
    kinds = {p.kind for p in request.prompt}
    if kinds <= {"text"}:
        return "".join(p.text for p in request.prompt)
    if kinds == {"tokens"}:
        return [t for p in request.prompt for t in p.tokens]
    raise InvalidRequest(
        f"{request.param}: a remote model's text completion takes text or token ids, not "
        f"{', '.join(sorted(kinds - {'text', 'tokens'})) or 'both'}",
        param=request.param,
    )


def openai_messages(messages: Sequence[Mapping[str, Any]], param: str) -> list[dict[str, Any]]:
    """Messages as the seam has them (OpenAI's roles; Ollama's images, calls with argument
    objects, tool results named but not linked) in OpenAI's own shape: images as content
    parts, arguments as JSON text, every call with an id and every tool result with its call's."""
    out: list[dict[str, Any]] = []
    pending: list[str] = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.get("role"), "content": m.get("content")}
        images = m.get("images") or []
        if images:
            parts: list[dict[str, Any]] = [{"type": "text", "text": msg["content"] or ""}]
            for image in images:
                if not isinstance(image, str):
                    raise InvalidRequest(
                        f"{param}: images of this kind cannot go upstream", param=param
                    )
                url = (
                    image
                    if image.startswith(("data:", "http://", "https://"))
                    else (f"data:image/jpeg;base64,{image}")
                )
                parts.append({"type": "image_url", "image_url": {"url": url}})
            msg["content"] = parts
        calls = m.get("tool_calls")
        if calls:
            msg["tool_calls"] = []
            for j, c in enumerate(calls):
                fn = c.get("function") or {}
                args = fn.get("arguments", {})
                call_id = c.get("id") or f"call_{i}_{j}"
                pending.append(call_id)
                msg["tool_calls"].append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {
                            "name": fn.get("name", ""),
                            "arguments": args
                            if isinstance(args, str)
                            else orjson.dumps(args).decode(),
                        },
                    }
                )
        if m.get("role") == "tool":
            msg["tool_call_id"] = m.get("tool_call_id") or (
                pending.pop(0) if pending else f"call_{i}"
            )
        elif m.get("name"):
            msg["name"] = m["name"]
        out.append(msg)
    return out


_FINISH = {"stop": "stop", "length": "length", "tool_calls": "stop", "function_call": "stop",
           "content_filter": "stop"}  # fmt: skip


class _Choice:
    """What an upstream's stream said of one choice so far."""

    __slots__ = ("calls", "finish", "thinking")

    def __init__(self) -> None:
        self.thinking = False
        self.calls: dict[int, dict[str, Any]] = {}
        self.finish: str | None = None


class RemoteGeneration:
    """An upstream's SSE stream of one request, as batches of Deltas."""

    def __init__(self, engine: RemoteEngine, call: Call, n: int, split: bool) -> None:
        self.engine = engine
        self.call = call
        self.n = n
        self.prompt_tokens: Sequence[int] = ()
        self.opens_thinking: bool | None = False if split else None
        """Reasoning the upstream sends apart comes back inside `<think>` tags, which the
        handlers split off as they do for local models."""
        self._choices = [_Choice() for _ in range(n)]
        self._usage: dict[str, Any] = {}
        self._t0 = time.perf_counter()
        self._first: float | None = None
        self._done = False

    async def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        response = self.call.response
        assert response is not None
        tail = b""
        try:
            async for data in response.content.iter_any():
                if is_disconnected is not None and is_disconnected():
                    return
                lines = (tail + data).split(b"\n")
                tail = lines.pop()
                batch = self._feed(lines)
                if batch:
                    yield batch
                if self._done:
                    return
            batch = self._feed([tail]) if tail else []
            yield batch + self._ended() if not self._done else batch
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self.call.close(failed=True)
            yield [Delta(0, -1, finish="error", error=self.call.timeout())]
        except (aiohttp.ClientError, OSError) as e:
            if self.call.closed:  # cancelled here: the client is gone
                return
            self.call.close(failed=True)
            yield [Delta(0, -1, finish="error", error=self.call.broken(e))]
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Close the upstream connection (the upstream aborts the request)."""
        self.call.close()
        self.engine._done(self)

    def close(self, failed: bool = False) -> None:
        self.cancel()

    def _feed(self, lines: list[bytes]) -> list[Delta]:
        out: list[Delta] = []
        for line in lines:
            line = line.rstrip(b"\r")
            if not line.startswith(b"data:"):
                continue  # blank separators, comments, `event:` lines
            payload = line[5:].strip()
            if payload == b"[DONE]":
                out += self._finishes()
                break
            try:
                chunk = orjson.loads(payload)
            except orjson.JSONDecodeError:
                out.append(self._failed(f"sent a malformed event: {payload[:200]!r}"))
                break
            if not isinstance(chunk, dict):
                out.append(self._failed(f"sent an event that is not an object: {payload[:200]!r}"))
                break
            if "error" in chunk:
                out.append(self._failed(upstream_message(payload)))
                break
            out += self._chunk(chunk)
        return out

    def _failed(self, message: str) -> Delta:
        self._done = True
        self.call.close(failed=True)
        error = UpstreamError(f"remote endpoint {self.engine.target.pool.name!r}: {message}")
        return Delta(0, -1, finish="error", error=error)

    def _chunk(self, chunk: dict[str, Any]) -> list[Delta]:
        out: list[Delta] = []
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for c in chunk.get("choices") or ():
            index = c.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < self.n:
                continue
            state = self._choices[index]
            delta = c.get("delta")
            text = _text(state, delta) if isinstance(delta, dict) else c.get("text") or ""
            if isinstance(delta, dict):
                for piece in delta.get("tool_calls") or ():
                    _add_call(state, piece)
            if text:
                if self._first is None:
                    self._first = time.perf_counter()
                out.append(Delta(0, index, text))
            if c.get("finish_reason"):
                state.finish = _FINISH.get(c["finish_reason"], "stop")
        return out

    def _finishes(self) -> list[Delta]:
        """Every choice's end, with its calls and the usage (which follows the last choice's
        finish_reason in OpenAI's streams, so the ends wait for `[DONE]`)."""
        self._done = True
        now = time.perf_counter()
        first = self._first or now
        out: list[Delta] = []
        for i, state in enumerate(self._choices):
            text = reasoning.CLOSE if state.thinking else ""
            calls = [
                {"id": c["id"], "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}}
                for _, c in sorted(state.calls.items())
            ]  # fmt: skip
            if text or calls:
                out.append(Delta(0, i, text, tool_calls=calls or None))
            usage = {
                "prompt_tokens": int(self._usage.get("prompt_tokens", 0)),
                "completion_tokens": int(self._usage.get("completion_tokens", 0)) if i == 0 else 0,
                "ttft_ms": (first - self._t0) * 1000,
                "gen_ms": (now - first) * 1000,
            }
            out.append(Delta(0, i, finish=state.finish or "stop", usage=usage))
        return out

    def _ended(self) -> list[Delta]:
        """The stream ended without `[DONE]`: fine if every choice had finished."""
        if all(c.finish for c in self._choices):
            return self._finishes()
        return [self._failed("closed its stream before the answer was complete")]


def _text(state: _Choice, delta: dict[str, Any]) -> str:
    """A chat delta's text; reasoning the upstream sends apart goes inside `<think>` tags."""
    thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
    content = delta.get("content") or ""
    text = ""
    if thought:
        text += "" if state.thinking else reasoning.OPEN
        state.thinking = True
        text += thought
    if content and state.thinking:
        text += reasoning.CLOSE
        state.thinking = False
    return text + content


def _add_call(state: _Choice, piece: Any) -> None:
    """One streamed piece of a tool call: its id and name first, then pieces of arguments."""
    if not isinstance(piece, dict):
        return
    index = piece.get("index", len(state.calls))
    fn = piece.get("function") or {}
    call = state.calls.setdefault(index, {"id": "", "name": "", "arguments": ""})
    call["id"] = piece.get("id") or call["id"] or f"call_{index}"
    call["name"] += fn.get("name") or ""
    args = fn.get("arguments")
    call["arguments"] += (
        args if isinstance(args, str) else (orjson.dumps(args).decode() if args else "")
    )


class Relayed:
    """An upstream's answer to a relayed request, piece by piece as it arrives."""

    def __init__(self, engine: RemoteEngine, call: Call, upstream: str, local: str) -> None:
        self.engine = engine
        self.call = call
        assert call.response is not None
        self.content_type = call.response.headers.get("Content-Type", "application/json")
        quoted, mine = orjson.dumps(upstream), orjson.dumps(local)
        self._names = [
            (b'"model":' + quoted, b'"model":' + mine),
            (b'"model": ' + quoted, b'"model": ' + mine),
        ]

    def _rename(self, data: bytes) -> bytes:
        for old, new in self._names:
            data = data.replace(old, new)
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The answer's bytes, whole lines at a time (so the model's name is never cut in two);
        a failure is raised as xllm's error."""
        response = self.call.response
        assert response is not None
        tail = b""
        try:
            async for data in response.content.iter_any():
                data = tail + data
                cut = data.rfind(b"\n") + 1
                tail = data[cut:]
                if cut:
                    yield self._rename(data[:cut])
            if tail:
                yield self._rename(tail)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            self.close(failed=True)
            raise self.call.timeout() from None
        except (aiohttp.ClientError, OSError) as e:
            if self.call.closed:  # cancelled here: the client is gone
                return
            self.close(failed=True)
            raise self.call.broken(e) from None

    def close(self, failed: bool = False) -> None:
        self.call.close(failed=failed)
        self.engine._done(self.call)


async def _load(spec: LoadSpec) -> RemoteEngine:
    if spec.remote is None:
        raise InvalidRequest(f"model {spec.name!r} names no remote endpoint", param="model")
    return RemoteEngine(spec, spec.remote)


def _estimate(spec: LoadSpec) -> Plan:
    return NO_MEMORY


MANIFEST = Manifest(
    name=KIND,
    version=__version__,
    abi=ABI_VERSION,
    formats=(KIND,),
    architectures=frozenset({"*"}),
    capabilities=frozenset(
        {
            Capability.COMPLETION,
            Capability.CHAT,
            Capability.EMBEDDING,
            Capability.TOOLS,
            Capability.VISION,
            Capability.THINKING,
        }
    ),
    load=_load,
    estimate=_estimate,
)
