"""Prompts of a chosen length in tokens, different for every request.

The server tokenizes a passage of ordinary prose once (`/api/generate` with `raw` answers with
the token ids in `context`); each prompt is then drawn from its distinct ids with its own seed.
Real tokens keep the model on its usual path, and prompts that differ from the first token or two
on defeat the prefix cache, so every request pays for its whole prompt as a new user's would.
Drawing each distinct id with equal odds (not as often as prose uses it: ",", "the" and "of"
make up a quarter of the passage) makes two prompts share a first token a third as often. The
counts reported are the server's own (`usage.prompt_tokens`), which may add a BOS token.
"""

from __future__ import annotations

import random

from xllm.cli import client

# The opening of "A Tale of Two Cities" (Dickens, 1859; public domain).
PASSAGE = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the "
    "age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the "
    "season of Light, it was the season of Darkness, it was the spring of hope, it was the winter "
    "of despair, we had everything before us, we had nothing before us, we were all going direct "
    "to Heaven, we were all going direct the other way - in short, the period was so far like the "
    "present period, that some of its noisiest authorities insisted on its being received, for "
    "good or for evil, in the superlative degree of comparison only. There were a king with a "
    "large jaw and a queen with a plain face, on the throne of England; there were a king with a "
    "large jaw and a queen with a fair face, on the throne of France."
)


def token_pool(model: str) -> list[int]:
    """The distinct token ids of the passage as `model` tokenizes it, without the ends (the
    first may be a BOS the tokenizer adds, the last may be cut mid-word)."""
    reply = client.call(
        "POST",
        "/api/generate",
        {
            "model": model,
            "prompt": PASSAGE,
            "raw": True,
            "stream": False,
            "options": {"num_predict": 1},
        },
        timeout=600,
    )
    count = int(reply["prompt_eval_count"])
    return list(dict.fromkeys(int(t) for t in reply["context"][:count][1:-1]))


def prompt(pool: list[int], length: int, seed: str) -> list[int]:
    """`length` token ids drawn from `pool`, the same for the same seed."""
    rng = random.Random(seed)
    return [rng.choice(pool) for _ in range(length)]
