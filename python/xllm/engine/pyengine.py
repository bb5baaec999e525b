"""A stand-in for `xllm._core.Engine` built on llama-cpp-python's `Llama`, one request at a time.

Same surface as the Rust engine so the runner can host either; used only while the extension
was built without the batching engine.
"""

from __future__ import annotations

import os
import queue
import random
import threading
import time
from typing import Any

import llama_cpp

from xllm import _core

_STOP = object()


class QueueFull(RuntimeError):
    pass


class PyEngine:
    def __init__(
        self,
        lib_path: str,
        lib_version: str,
        model_path: str,
        *,
        ctx_size: int,
        parallel: int,
        threads: int,
        batch_size: int = 512,
        gpu_layers: int = 0,
        max_queue: int = 1000,
    ) -> None:
        self._path = model_path
        self._threads = threads
        self.llm = llama_cpp.Llama(
            model_path,
            n_ctx=ctx_size,
            n_threads=threads,
            n_batch=batch_size,
            n_gpu_layers=gpu_layers,
            verbose=False,
        )
        self._ctx_size = ctx_size
        self._embedder: llama_cpp.Llama | None = None
        self._max_queue = max_queue
        self._parallel = parallel
        self._queue: queue.Queue[Any] = queue.Queue()
        self._events: list[Any] = []
        self._lock = threading.Lock()
        self._cancelled: set[int] = set()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        self._stats: dict[str, int | float] = dict.fromkeys(
            (
                "requests_total", "tokens_prompt_total", "tokens_cached_total",
                "tokens_generated_total", "decode_steps_total", "running",
            ),
            0,
        )  # fmt: skip
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    # model facts
    def metadata(self) -> dict[str, str]:
        return dict(self.llm.metadata)

    @property
    def n_ctx_train(self) -> int:
        return int(llama_cpp.llama_model_n_ctx_train(self.llm.model))

    @property
    def n_embd(self) -> int:
        return int(llama_cpp.llama_model_n_embd(self.llm.model))

    @property
    def n_vocab(self) -> int:
        return int(self.llm.n_vocab())

    @property
    def n_layer(self) -> int:
        return int(llama_cpp.llama_model_n_layer(self.llm.model))

    @property
    def n_params(self) -> int:
        return int(llama_cpp.llama_model_n_params(self.llm.model))

    @property
    def model_size(self) -> int:
        return int(llama_cpp.llama_model_size(self.llm.model))

    def tokenize(self, text: str, add_special: bool, parse_special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode(), add_bos=add_special, special=parse_special))

    def detokenize(self, tokens: list[int]) -> str:
        return self.llm.detokenize(tokens).decode("utf-8", "replace")

    def token_piece(self, token: int) -> bytes:
        return bytes(self.llm.detokenize([token], special=True))

    # generation
    def submit(
        self,
        request_id: int,
        prompt: list[int],
        params: dict[str, Any],
        frames: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self._ctx_size:
            raise ValueError(f"the prompt is longer than the context ({self._ctx_size})")
        if self._queue.qsize() >= self._max_queue:
            raise QueueFull("queue full")
        self._queue.put((request_id, prompt, params, frames))

    def cancel(self, request_id: int) -> None:
        self._cancelled.add(request_id)

    def fileno(self) -> int:
        return self._r

    def poll(self) -> list[Any]:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            out, self._events = self._events, []
        return out

    def stats(self) -> dict[str, int | float]:
        return {**self._stats, "queue_depth": self._queue.qsize(), "parallel": self._parallel}

    def embed(self, prompts: list[list[int]], normalize: bool = True) -> list[list[float]]:
        if self._embedder is None:
            self._embedder = llama_cpp.Llama(
                self._path, embedding=True, n_ctx=self._ctx_size, n_threads=self._threads,
                verbose=False, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            )  # fmt: skip
        texts = [self.detokenize(p) for p in prompts]
        out = self._embedder.embed(texts, normalize=normalize)
        return [list(map(float, v)) for v in out]  # type: ignore[arg-type]

    def close(self) -> None:
        self._queue.put(_STOP)
        self._thread.join(timeout=30)

    def _emit(self, ev: Any) -> None:
        with self._lock:
            self._events.append(ev)
        os.write(self._w, b"x")

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            rid, prompt, params, frames = item
            self._stats["requests_total"] += 1
            self._stats["running"] = 1
            for index in range(int(params.get("n", 1))):
                self._generate(rid, index, prompt, params, frames)
            self._stats["running"] = 0
            self._cancelled.discard(rid)

    def _generate(
        self, rid: int, index: int, prompt: list[int], params: dict[str, Any], frames: Any
    ) -> None:
        llm = self.llm
        seed = params.get("seed")
        llm.set_seed(int(seed) if seed is not None else random.randrange(2**31))
        matcher = _core.StopMatcher(list(params.get("stop") or []))
        framer = _core.DeltaFramer(*frames[index]) if frames else None
        max_tokens = int(params.get("max_tokens") or (self._ctx_size - len(prompt)))
        t0 = time.perf_counter()
        ttft = None
        n = 0
        finish = "length"
        self._stats["tokens_prompt_total"] += len(prompt)
        temp = float(params.get("temperature", 0.8))
        for tok in llm.generate(
            prompt,
            top_k=int(params.get("top_k", 40)),
            top_p=float(params.get("top_p", 0.95)),
            min_p=float(params.get("min_p", 0.05)),
            temp=temp,
            repeat_penalty=float(params.get("repeat_penalty", 1.0)),
            frequency_penalty=float(params.get("frequency_penalty", 0.0)),
            presence_penalty=float(params.get("presence_penalty", 0.0)),
            reset=True,
        ):
            if rid in self._cancelled:
                finish = "cancelled"
                break
            if ttft is None:
                ttft = (time.perf_counter() - t0) * 1000
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, tok) and not params.get("ignore_eos"):
                finish = "stop"
                break
            n += 1
            self._stats["tokens_generated_total"] += 1
            self._stats["decode_steps_total"] += 1
            text, stopped = matcher.push(llm.detokenize([tok], prev_tokens=None))
            if text:
                self._emit((rid, index, text, framer.frame(text) if framer else None, None, None))
            if stopped:
                finish = "stop"
                break
            if n >= max_tokens:
                break
        rest = matcher.flush()
        gen_ms = (time.perf_counter() - t0) * 1000 - (ttft or 0)
        extra = {
            "prompt_tokens": len(prompt),
            "cached_tokens": 0,
            "completion_tokens": n,
            "ttft_ms": ttft or 0.0,
            "gen_ms": gen_ms,
        }
        if rest:
            self._emit((rid, index, rest, framer.frame(rest) if framer else None, None, None))
        self._emit((rid, index, "", None, finish, extra))
