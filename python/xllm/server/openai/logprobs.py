"""Engine logprob entries in OpenAI's two shapes (chat and legacy completions)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# (token text, logprob, token bytes, [(alt text, alt logprob, alt bytes), ...]) from the engine
Entry = tuple[str, float, bytes, list[tuple[str, float, bytes]]]


def chat_logprobs(entries: Sequence[Entry]) -> dict[str, Any]:
    return {
        "content": [
            {
                "token": tok,
                "logprob": lp,
                "bytes": list(raw),
                "top_logprobs": [{"token": t, "logprob": p, "bytes": list(b)} for t, p, b in top],
            }
            for tok, lp, raw, top in entries
        ]
    }


def completion_logprobs(entries: Sequence[Entry], offset: int = 0) -> dict[str, Any]:
    tokens, lps, tops, offsets = [], [], [], []
    for tok, lp, _, top in entries:
        offsets.append(offset)
        offset += len(tok)
        tokens.append(tok)
        lps.append(lp)
        tops.append({t: p for t, p, _ in top})
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
