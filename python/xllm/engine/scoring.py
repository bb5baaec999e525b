"""Perplexity and KL divergence from logits, as llama.cpp's `llama-perplexity` computes them
(tools/perplexity/perplexity.cpp): per token, the negative log-likelihood of the next token
under a log-softmax taken in float with the sum of exponentials in double; PPL = exp(mean NLL)
with the standard error of the mean NLL carried through; KL divergence of a model's
distribution from a reference's, token by token, and how often their top tokens agree.

Pure numpy over (positions x vocabulary) arrays, so one chunk is a few vectorised passes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

Logits = npt.NDArray[np.float32]


def log_softmax(logits: Logits) -> Logits:
    """Row-wise log-probabilities (float32 rows, each row's sum in float64 like llama.cpp)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    total = np.exp(shifted).sum(axis=1, dtype=np.float64, keepdims=True)
    out: Logits = shifted - np.log(total).astype(np.float32)
    return out


def token_nll(logprobs: Logits, next_tokens: npt.NDArray[np.int32]) -> npt.NDArray[np.float64]:
    """-log p(next token) at each position."""
    rows = np.arange(len(next_tokens))
    return -logprobs[rows, next_tokens].astype(np.float64)


def kl_divergence(reference: Logits, other: Logits) -> npt.NDArray[np.float64]:
    """KL(reference || other) per position, from the two models' log-probabilities."""
    p = np.exp(reference)
    return np.einsum("ij,ij->i", p, reference - other, dtype=np.float64)  # type: ignore[no-any-return]


def mean_error(values: npt.NDArray[np.float64]) -> tuple[float, float]:
    """(mean, standard error of the mean): sqrt((E[x^2] - E[x]^2) / (n - 1)), llama.cpp's form."""
    n = len(values)
    mean = float(values.mean())
    var = float((values * values).mean()) - mean * mean
    return mean, math.sqrt(var / (n - 1)) if var > 0 and n > 1 else 0.0


@dataclass
class Perplexity:
    """The NLL of every scored token of a text, chunk after chunk."""

    nll: list[npt.NDArray[np.float64]] = field(default_factory=list)

    def add(self, logprobs: Logits, next_tokens: npt.NDArray[np.int32]) -> None:
        self.nll.append(token_nll(logprobs, next_tokens))

    def report(self) -> dict[str, Any]:
        values = np.concatenate(self.nll)
        mean, err = mean_error(values)
        ppl = math.exp(mean)
        return {"ppl": ppl, "ppl_error": ppl * err, "mean_nll": mean, "tokens": len(values)}


@dataclass
class Divergence:
    """KL divergence and top-token agreement of a model against a reference, chunk after chunk."""

    kld: list[npt.NDArray[np.float64]] = field(default_factory=list)
    same_top: list[npt.NDArray[np.bool_]] = field(default_factory=list)

    def add(self, reference: Logits, other: Logits) -> None:
        self.kld.append(kl_divergence(reference, other))
        self.same_top.append(reference.argmax(axis=1) == other.argmax(axis=1))

    def report(self) -> dict[str, Any]:
        kld = np.concatenate(self.kld)
        same = np.concatenate(self.same_top).astype(np.float64)
        mean, err = mean_error(kld)
        top, top_err = mean_error(same)
        return {
            "kld_mean": mean,
            "kld_error": err,
            "kld_median": float(np.percentile(kld, 50)),
            "kld_p99": float(np.percentile(kld, 99)),
            "kld_max": float(kld.max()),
            "same_top_pct": 100 * top,
            "same_top_error_pct": 100 * top_err,
            "tokens": len(kld),
        }
