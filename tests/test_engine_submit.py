"""The Rust engine's `submit`, called on the runner's event loop: it must never wait for the
decode loop, which holds the LoRA adapter table through every llama_decode (a 512-token prompt
chunk takes seconds on a small CPU). It once did, and the runner's loop stalled for the whole
decode: chat renders on it timed out and came back as 400s."""

from __future__ import annotations

import select
import threading
import time
from pathlib import Path

from xllm._core import Delta
from xllm.engine.llamacpp import LlamaCppEngine
from xllm.engine.options import EngineOptions


def test_submit_returns_at_once_while_a_long_prompt_decodes(smollm2_path: Path) -> None:
    options = EngineOptions(ctx_size=4096, parallel=2, threads=2, batch_size=2048)
    engine = LlamaCppEngine(smollm2_path, options)
    try:
        long = engine.tokenize(
            " ".join(f"Line {i} of a long text." for i in range(120)), True, True
        )
        assert len(long) > 600
        deltas: list[Delta] = []
        stop = threading.Event()

        def pump() -> None:
            while not stop.is_set():
                select.select([engine.fileno()], [], [], 0.1)
                deltas.extend(engine.poll())

        reader = threading.Thread(target=pump)
        reader.start()
        started = time.perf_counter()
        engine.submit(1, long, {"max_tokens": 1, "temperature": 0.0})
        time.sleep(0.3)  # its one decode of the whole prompt is under way
        before = time.perf_counter()
        engine.submit(2, engine.tokenize("Hello", True, True), {"max_tokens": 1})
        took = time.perf_counter() - before
        while sum(1 for d in deltas if d.finish) < 2:
            time.sleep(0.05)
        prompt_done = time.perf_counter() - started
        stop.set()
        reader.join()
        # the prompt's decode took far longer than the second submit waited
        assert prompt_done > 1.0, prompt_done
        assert took < 0.1, took
    finally:
        engine.close()
