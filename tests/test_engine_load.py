"""What loading a model leaves: a context warmed up as llama-server's is (one decode of BOS and
EOS), whose cache is empty again, so the first request starts from position 0 and answers as a
cold context does."""

from __future__ import annotations

import select
from pathlib import Path

import llama_cpp as lc

from xllm.engine.llamacpp import LlamaCppEngine
from xllm.engine.options import EngineOptions


def _greedy_cold(path: Path, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from llama-cpp-python's own context, never warmed up (flash attention
    on, as on a CPU context xllm creates with llama.cpp's defaults)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=512, flash_attn=True, n_threads=2, verbose=False)
    try:
        tokens = llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0)
        return [next(tokens) for _ in range(n)]
    finally:
        llm.close()


def test_the_warm_up_leaves_an_empty_cache_and_the_same_answer(smollm2_path: Path) -> None:
    engine = LlamaCppEngine(smollm2_path, EngineOptions(ctx_size=512, parallel=1, threads=2))
    try:
        memory = lc.llama_get_memory(engine._ctx)
        assert lc.llama_memory_seq_pos_max(memory, 0) == -1  # the warm-up's cells are gone
        prompt = engine.tokenize("The capital of France is", True, True)
        engine.submit(1, prompt, {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True})
        tokens: list[int] = []
        done = False
        while not done:
            select.select([engine.fileno()], [], [], 1.0)
            for delta in engine.poll():
                tokens.extend(delta.tokens)
                done = done or delta.finish is not None
    finally:
        engine.close()
    assert tokens == _greedy_cold(smollm2_path, prompt, 8)
