"""Embeddings: the serving function both dialects share (`/v1/embeddings`, `/api/embed` and the
legacy `/api/embeddings`).

Handlers translate their wire format into `embed`'s arguments and its `Embeddings` back; the
work between (texts or token ids to tokens, the context-length rule, the engine call, the token
count) is done here once. Nothing here knows about HTTP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from xllm.engine.protocol import Embedder, Engine, TextEmbedder, Tokenizer
from xllm.errors import InvalidRequest


@dataclass(frozen=True)
class Embeddings:
    vectors: list[list[float]]
    """One per input, in order."""
    prompt_tokens: int
    """Tokens embedded, all inputs together (after truncation)."""


def refuse_lora(asked: bool, param: str) -> None:
    """A 400 naming `param` when a request names LoRA adapters: the embeddings context applies
    only the model's own (Modelfile ADAPTER), never a request's."""
    if asked:
        raise InvalidRequest(
            f"{param}: embeddings take no per-request LoRA adapters; create a model with the "
            "adapter (Modelfile ADAPTER) to embed with it",
            param=param,
        )


async def embed(
    model: Engine,
    inputs: Sequence[str | Sequence[int]],
    *,
    truncate: bool,
    normalize: bool = True,
    param: str = "input",
) -> Embeddings:
    """Embed each input (a text, or token ids the client tokenized) on `model`.

    Texts are tokenized with special tokens, as the model saw them in training; token ids must be
    in its vocabulary. An input longer than the context is cut to it when `truncate`, else
    refused. Errors are 400s naming `param`, the request field the inputs came from.
    """
    if isinstance(model, TextEmbedder):  # tokenized, checked and truncated where it runs
        return Embeddings(*await model.embed_texts(inputs, normalize=normalize))
    if not (isinstance(model, Embedder) and isinstance(model, Tokenizer)):
        raise InvalidRequest(f"model {model.name!r} does not support embeddings", param="model")
    tokens = [
        await model.tokenize(x, special=True)
        if isinstance(x, str)
        else model.info.check_tokens(x, param)
        for x in inputs
    ]
    for i, t in enumerate(tokens):
        if not t:
            raise InvalidRequest(f"{param}[{i}] is empty", param=param)
        if len(t) > model.ctx_size and not truncate:
            raise InvalidRequest(
                f"{param}[{i}] is {len(t)} tokens, more than the context length {model.ctx_size}",
                param=param,
            )
    tokens = [t[: model.ctx_size] for t in tokens]
    vectors = await model.embed(tokens, normalize)
    return Embeddings(vectors, sum(len(t) for t in tokens))
