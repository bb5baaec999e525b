"""The temperature-0 response cache: a greedy answer asked for again is replayed, not recomputed.

It sits where every generating request meets its engine (`http.start_generation`), so OpenAI
chat, completions and Responses and Ollama chat and generate share it, streamed or not. A hit
replays the recorded delta batches through the same stream pump, so a client sees the same
records, usage, finish reason and log-probabilities as the first answer, and the runner is
never asked (it may be busy with others).

The key is a SHA-256 over the model's identity (engine kind, its file's path, size and mtime,
its Modelfile, its context size: a new pull, a re-create or a reload with another context is a
new key, so nothing stale is served) and the whole engine `Request` with its effective
sampling. The request is what the engine renders into a prompt deterministically; keying on it
instead of the rendered token ids costs a miss when two differently written requests render
alike, but needs no round trip to the runner to tokenize. Requests with images or audio, at a
temperature above 0, with n > 1, or to a remote upstream are not cached. Only answers whose
choice ended with stop or length are stored; errors and cancelled ones never are.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import orjson

from xllm.engine.llama_prompt import modelfile_defaults
from xllm.engine.protocol import Delta, Engine, Generation, Loras, Request, Sampling

UNCACHED_KINDS = frozenset({"remote"})
"""Engines whose answers are not theirs to vouch for (an upstream may change its model)."""
_STORED = ("stop", "length")


@dataclass(frozen=True)
class Answer:
    """A finished greedy answer as its generation gave it."""

    batches: tuple[tuple[Delta, ...], ...]
    prompt_tokens: tuple[int, ...]
    opens_thinking: bool | None
    size: int
    """Bytes it holds, about (what the LRU bound counts)."""


class ResponseCache:
    """Answers by key, least recently used evicted first once they hold over `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._answers: OrderedDict[str, Answer] = OrderedDict()

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, key: str) -> Answer | None:
        answer = self._answers.get(key)
        if answer is None:
            self.misses += 1
            return None
        self._answers.move_to_end(key)
        self.hits += 1
        return answer

    def put(self, key: str, answer: Answer) -> None:
        if answer.size > self.max_bytes:
            return
        old = self._answers.pop(key, None)
        if old is not None:
            self.bytes -= old.size
        self._answers[key] = answer
        self.bytes += answer.size
        while self.bytes > self.max_bytes:
            _, evicted = self._answers.popitem(last=False)
            self.bytes -= evicted.size


def key(engine: Engine, request: Request) -> str | None:
    """The request's cache key on `engine`; None when it is not to be cached."""
    if engine.kind in UNCACHED_KINDS:
        return None
    sampling = request.sampling.over(modelfile_defaults(engine.modelfile)).over(request.defaults)
    if sampling.temperature != 0 or sampling.n != 1:
        return None
    if any(p.kind in ("image", "audio") for p in request.prompt):
        return None
    if any(m.get("images") or m.get("audio") for m in request.messages or ()):
        return None
    try:
        stat = engine.info.path.stat()
    except OSError:
        return None
    model = (engine.kind, str(engine.info.path), stat.st_size, stat.st_mtime_ns, engine.ctx_size)
    # an adapter file replaced under its name is another adapter
    adapters = (
        engine.lora_files([n for n, _ in sampling.lora or ()]) if isinstance(engine, Loras) else []
    )
    # the effective sampling holds the defaults; greedy decoding draws no random numbers
    effective = replace(request, sampling=replace(sampling, seed=None), defaults=Sampling())
    try:
        text = orjson.dumps(
            [model, repr(engine.modelfile), adapters, effective],
            default=_unkeyable,
            option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SORT_KEYS,
        )
    except TypeError:
        return None
    return hashlib.sha256(text).hexdigest()


def _unkeyable(value: Any) -> Any:
    if isinstance(value, bytes):  # a text part's empty `data`
        return value.hex()
    raise TypeError(f"{type(value).__name__} is not keyed")


class Replay:
    """A cached answer as a `Generation`: its batches again, one by one."""

    n = 1

    def __init__(self, answer: Answer) -> None:
        self._answer = answer
        self._cancelled = False

    @property
    def prompt_tokens(self) -> Sequence[int]:
        return self._answer.prompt_tokens

    @property
    def opens_thinking(self) -> bool | None:
        return self._answer.opens_thinking

    async def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        for batch in self._answer.batches:
            if self._cancelled or (is_disconnected is not None and is_disconnected()):
                return
            yield list(batch)

    def cancel(self) -> None:
        self._cancelled = True


class Recording:
    """A live `Generation` that stores its answer in the cache once it finishes normally."""

    def __init__(self, gen: Generation, cache: ResponseCache, key: str) -> None:
        self._gen = gen
        self._cache = cache
        self._key = key

    @property
    def n(self) -> int:
        return self._gen.n

    @property
    def prompt_tokens(self) -> Sequence[int]:
        return self._gen.prompt_tokens

    @property
    def opens_thinking(self) -> bool | None:
        return self._gen.opens_thinking

    async def deltas(
        self, is_disconnected: Callable[[], bool] | None = None
    ) -> AsyncIterator[list[Delta]]:
        batches: list[tuple[Delta, ...]] = []
        async for batch in self._gen.deltas(is_disconnected):
            batches.append(tuple(batch))
            ends = [d for d in batch if d.finish is not None]
            if ends and all(d.finish in _STORED and d.error is None for d in ends):
                self._store(batches)
            yield batch

    def _store(self, batches: list[tuple[Delta, ...]]) -> None:
        prompt = tuple(self._gen.prompt_tokens)
        size = len(self._key) + 8 * len(prompt) + sum(_size(d) for b in batches for d in b)
        self._cache.put(self._key, Answer(tuple(batches), prompt, self._gen.opens_thinking, size))

    def cancel(self) -> None:
        self._gen.cancel()


def _size(d: Delta) -> int:
    """About what a delta holds in memory: its text, tokens, log-probabilities and calls."""
    size = 100 + len(d.text.encode()) + 8 * len(d.tokens)
    for text, _, raw, top in d.logprobs or ():
        size += 60 + len(text) + len(raw) + sum(60 + len(t) + len(b) for t, _, b in top)
    if d.tool_calls:
        size += len(orjson.dumps(d.tool_calls))
    if d.usage:
        size += 40 * len(d.usage)
    return size
