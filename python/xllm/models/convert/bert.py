"""BERT encoders (all-MiniLM, bge, e5...): embeddings with sentence-transformers' pooling.

As llama.cpp's converter does: the WordPiece vocabulary becomes a "phantom space" one (`##x`
-> `x`, any other word -> `▁x`, `[...]` tokens kept), attention is not causal, and the pooler
and masked-LM heads are dropped (only embeddings are served).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gguf import MODEL_ARCH, GGUFWriter

from xllm.models.convert import vocab
from xllm.models.convert.writer import Family, Tensors, common_params, pooling, renamer

ARCHITECTURES = ("BertModel", "BertForMaskedLM", "CamembertModel")
_DROPPED = ("embeddings.position_ids", "pooler.", "cls.")


def _params(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    common_params(w, config)
    w.add_causal_attention(False)
    pooling(w, folder)


def _phantom(token: str) -> str:
    if token.startswith("[") and token.endswith("]"):
        return token
    return token[2:] if token.startswith("##") else "\u2581" + token


def _vocab(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    v = vocab.load(folder, config.get("vocab_size"))
    v.tokens = [_phantom(t) for t in v.tokens]
    w.add_token_type_count(config.get("type_vocab_size", 1))
    vocab.write(w, folder, "bert", v, merges=False)


def _tensors(tensors: Tensors, config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    rename = renamer(MODEL_ARCH.BERT, config["num_hidden_layers"])
    for name, array in tensors:
        name = name.removeprefix("bert.")
        name = name.removesuffix(".gamma") + ".weight" if name.endswith(".gamma") else name
        name = name.removesuffix(".beta") + ".bias" if name.endswith(".beta") else name
        if not name.startswith(_DROPPED):
            yield rename(name), array


FAMILY = Family(MODEL_ARCH.BERT, _params, _vocab, _tensors)
