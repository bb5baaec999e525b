"""What loading a model leaves: a context warmed up as llama-server's is (one decode of BOS and
EOS), whose cache is empty again, so the first request starts from position 0 and answers as a
cold context does."""

from __future__ import annotations

import select
from pathlib import Path

import llama_cpp as lc

from xllm.engine.llamacpp import LlamaCppEngine, load_model
from xllm.engine.options import EngineOptions


def _greedy_cold(path: Path, prompt: list[int], n: int) -> list[int]:
    """`n` greedy tokens from a fresh context that was never warmed up."""
    model = load_model(path, [], lc.llama_model_default_params())
    params = lc.llama_context_default_params()
    params.n_ctx, params.n_threads, params.n_threads_batch = 512, 2, 2
    ctx = lc.llama_init_from_model(model, params)
    vocab = lc.llama_model_get_vocab(model)
    n_vocab = lc.llama_vocab_n_tokens(vocab)
    out: list[int] = []
    try:
        batch = (lc.llama_token * len(prompt))(*prompt)
        assert lc.llama_decode(ctx, lc.llama_batch_get_one(batch, len(prompt))) == 0
        for _ in range(n):
            logits = lc.llama_get_logits_ith(ctx, -1)
            token = max(range(n_vocab), key=lambda i: logits[i])
            out.append(token)
            one = (lc.llama_token * 1)(token)
            assert lc.llama_decode(ctx, lc.llama_batch_get_one(one, 1)) == 0
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)
    return out


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
