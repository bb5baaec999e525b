"""`xllm compare`'s measurements on model files, in a child process (`xllm evaluate`): a
GGML_ABORT inside llama.cpp ends the process it runs in, and that must not be the CLI.

The request comes as JSON on stdin; progress lines `{"progress": [done, total]}` and then one
`{"result": ...}` (or `{"error": "..."}`) go to stdout; llama.cpp's log goes to stderr, for the
parent to quote if the child dies.

Perplexity follows llama-perplexity: the whole text tokenized once (with BOS when the vocabulary
adds it), cut into chunks of n_ctx tokens, each chunk decoded alone from an empty cache with its
first token replaced by BOS, and only its second half scored (each scored token has at least
n_ctx/2 tokens of context). One `llama_decode` per chunk asks logits for exactly the scored
positions. Two models that share a vocabulary run in lockstep over the same tokens, so the KL
divergence of B from A needs no logits file.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as lc
import numpy as np
import numpy.typing as npt

from xllm.engine.llamacpp import load_model, token_piece, tokenize
from xllm.engine.scoring import Divergence, Logits, Perplexity, log_softmax

Tokens = npt.NDArray[np.int32]


class TextTooShort(ValueError):
    pass


@dataclass(frozen=True)
class ModelSpec:
    path: str
    splits: tuple[str, ...] = ()
    gpu_layers: int = 0


@dataclass(frozen=True)
class Request:
    models: tuple[ModelSpec, ...]
    text: str
    ctx: int
    chunks: int | None
    threads: int
    prompts: tuple[str, ...]
    max_tokens: int

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Request:
        models = tuple(
            ModelSpec(m["path"], tuple(m.get("splits", ())), m.get("gpu_layers", 0))
            for m in data["models"]
        )
        fields = {k: v for k, v in data.items() if k != "models"}
        fields["prompts"] = tuple(fields["prompts"])
        return cls(models=models, **fields)


class Model:
    """One model with a context of exactly one chunk (n_ctx = n_batch = n_ubatch), so a chunk
    is one decode, and a batch whose arrays numpy fills in place."""

    def __init__(self, spec: ModelSpec, ctx: int, threads: int) -> None:
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = spec.gpu_layers
        self.model = load_model(Path(spec.path), spec.splits, mparams)
        self.vocab = lc.llama_model_get_vocab(self.model)
        self.n_vocab = int(lc.llama_vocab_n_tokens(self.vocab))
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {ctx} tokens")
        self.n_ctx = ctx
        self.batch = lc.llama_batch_init(ctx, 0, 1)
        self._token = np.ctypeslib.as_array(self.batch.token, shape=(ctx,))
        self._pos = np.ctypeslib.as_array(self.batch.pos, shape=(ctx,))
        self._output = np.ctypeslib.as_array(self.batch.logits, shape=(ctx,))
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(ctx,))[:] = 1
        for i in range(ctx):
            self.batch.seq_id[i][0] = 0
        self.decode_seconds = 0.0
        self.decoded_tokens = 0

    def vocab_digest(self) -> str:
        """SHA-256 of the token texts in id order: equal for models that share a vocabulary."""
        h = hashlib.sha256()
        for i in range(self.n_vocab):
            h.update(lc.llama_vocab_get_text(self.vocab, i) or b"")
            h.update(b"\0")
        return h.hexdigest()

    def decode(self, tokens: Tokens, pos: int, outputs: slice) -> Logits:
        """Decode `tokens` at positions pos.. and return the logits rows of `outputs` (indices
        into `tokens`): a view of llama.cpp's buffer, valid until the next decode."""
        n = len(tokens)
        self._token[:n] = tokens
        self._pos[:n] = np.arange(pos, pos + n, dtype=np.int32)
        self._output[:n] = 0
        self._output[outputs] = 1
        n_out = len(range(n)[outputs])
        self.batch.n_tokens = n
        t0 = time.perf_counter()
        rc = lc.llama_decode(self.ctx, self.batch)
        self.decode_seconds += time.perf_counter() - t0
        self.decoded_tokens += n
        if rc != 0:
            raise RuntimeError(f"llama_decode failed ({rc})")
        ptr = lc.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab))

    def chunk_logprobs(self, chunk: Tokens) -> Logits:
        """Log-probabilities at the scored positions n_ctx/2 .. n_ctx-2 of one chunk (the last
        position predicts nothing inside the chunk)."""
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        first = self.n_ctx // 2
        return log_softmax(self.decode(chunk, 0, slice(first, self.n_ctx - 1)))

    def text_tokens(self, text: str) -> Tokens:
        return np.asarray(tokenize(self.vocab, text, True, False), dtype=np.int32)

    def chunk(self, tokens: Tokens, i: int) -> Tokens:
        """The i-th chunk, its first token replaced by BOS as llama-perplexity does."""
        chunk = tokens[i * self.n_ctx : (i + 1) * self.n_ctx].copy()
        if lc.llama_vocab_get_add_bos(self.vocab):
            chunk[0] = lc.llama_vocab_bos(self.vocab)
        return chunk

    def generate(self, prompt: str, max_tokens: int) -> tuple[str, int, float]:
        """Greedy continuation of `prompt`: (text, tokens generated, seconds generating)."""
        lc.llama_memory_clear(lc.llama_get_memory(self.ctx), True)
        tokens = self.text_tokens(prompt)
        if len(tokens) >= self.n_ctx:
            raise ValueError(f"prompt {prompt[:40]!r} is longer than the context ({self.n_ctx})")
        budget = min(max_tokens, self.n_ctx - len(tokens))
        logits = self.decode(tokens, 0, slice(len(tokens) - 1, len(tokens)))
        out: list[int] = []
        t0 = time.perf_counter()
        while True:
            token = int(logits[0].argmax())
            if lc.llama_vocab_is_eog(self.vocab, token):
                break
            out.append(token)
            if len(out) == budget:
                break
            logits = self.decode(
                np.array([token], np.int32), len(tokens) + len(out) - 1, slice(0, 1)
            )
        seconds = time.perf_counter() - t0
        text = b"".join(token_piece(self.vocab, t) for t in out).decode("utf-8", "replace")
        return text, len(out), seconds

    def close(self) -> None:
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)


def perplexity(
    models: list[Model], text: str, max_chunks: int | None, progress: Callable[[int, int], None]
) -> dict[str, Any]:
    """PPL of each model over the text and, when they share a vocabulary, the KL divergence of
    the others' distributions from the first's (llama-perplexity's --kl-divergence)."""
    digests = [m.vocab_digest() for m in models]
    shared = len(set(digests)) == 1
    tokens = [models[0].text_tokens(text)] * len(models) if shared else [
        m.text_tokens(text) for m in models
    ]  # fmt: skip
    n_ctx = models[0].n_ctx
    fewest = min(len(t) for t in tokens)
    if fewest < 2 * n_ctx:
        raise TextTooShort(
            f"the text is {fewest} tokens: perplexity with a context of {n_ctx} needs at least "
            f"{2 * n_ctx} (a longer --text or a smaller --ctx)"
        )
    n_chunks = fewest // n_ctx if max_chunks is None else min(max_chunks, fewest // n_ctx)
    ppl = [Perplexity() for _ in models]
    seconds = [0.0 for _ in models]
    divergence = [Divergence() for _ in models[1:]] if shared else []
    first = n_ctx // 2
    for c in range(n_chunks):
        logprobs = []
        for k, m in enumerate(models):
            t0 = time.perf_counter()
            chunk = m.chunk(tokens[k], c)
            lp = m.chunk_logprobs(chunk)
            ppl[k].add(lp, chunk[first + 1 :])
            seconds[k] += time.perf_counter() - t0
            logprobs.append(lp)
        for d, lp in zip(divergence, logprobs[1:], strict=True):
            d.add(logprobs[0], lp)
        progress(c + 1, n_chunks)
    return {
        "tokens": [len(t) for t in tokens],
        "chunks": n_chunks,
        "shared_vocab": shared,
        "vocab_digests": digests,
        "models": [
            {**p.report(), "seconds": s, "tokens_per_s": n_chunks * n_ctx / s}
            for p, s in zip(ppl, seconds, strict=True)
        ],
        "divergence": [d.report() for d in divergence],
    }


def evaluate(req: Request, progress: Callable[[int, int], None]) -> dict[str, Any]:
    lc.llama_backend_init()
    models: list[Model] = []
    try:
        for spec in req.models:
            models.append(Model(spec, req.ctx, req.threads))
        result = perplexity(models, req.text, req.chunks, progress)
        for m, report in zip(models, result["models"], strict=True):
            runs = [m.generate(prompt, req.max_tokens) for prompt in req.prompts]
            n = sum(r[1] for r in runs)
            seconds = sum(r[2] for r in runs)
            report["generation"] = {
                "outputs": [r[0] for r in runs],
                "tokens": n,
                "seconds": seconds,
                "tokens_per_s": n / seconds if seconds > 0 else 0.0,
            }
        return result
    finally:
        for m in models:
            m.close()


def main() -> int:
    def emit(record: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(record) + "\n")
        sys.stdout.flush()

    req = Request.from_json(json.load(sys.stdin))
    try:
        result = evaluate(req, lambda done, total: emit({"progress": [done, total]}))
    except (ValueError, RuntimeError) as e:
        emit({"error": str(e)})
        return 1
    emit({"result": result})
    return 0
