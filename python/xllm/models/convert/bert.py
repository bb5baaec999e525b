"""BERT encoders (all-MiniLM, bge, e5...): embeddings with sentence-transformers' pooling.

As llama.cpp's converter does: the WordPiece vocabulary becomes a "phantom space" one (`##x`
-> `x`, any other word -> `▁x`, `[...]` tokens kept), attention is not causal, and the pooler
and masked-LM heads are dropped (only embeddings are served).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gguf import MODEL_ARCH, GGUFWriter, PoolingType, ReaderTensor

from xllm.models.convert import vocab
from xllm.models.convert.meta import Meta, common_config
from xllm.models.convert.writer import Family, Reverse, Tensors, common_params, pooling, renamer

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


def _names(config: dict[str, Any]) -> list[str]:
    pairs = ("weight", "bias")
    layer = (
        *(f"attention.self.{t}.{k}" for t in ("query", "key", "value") for k in pairs),
        *(f"{t}.{k}" for t in ("attention.output.dense", "attention.output.LayerNorm",
                               "intermediate.dense", "output.dense", "output.LayerNorm")
          for k in pairs),
    )  # fmt: skip
    return [
        *(f"embeddings.{t}_embeddings.weight" for t in ("word", "position", "token_type")),
        "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
        *(f"encoder.layer.{i}.{n}" for i in range(config["num_hidden_layers"]) for n in layer),
    ]  # fmt: skip


def _config(m: Meta, tensors: Mapping[str, ReaderTensor]) -> dict[str, Any]:
    config = {"architectures": ["BertModel"], "model_type": "bert", **common_config(m)}
    config["hidden_act"] = "gelu"
    config["type_vocab_size"] = m.get("tokenizer.ggml.token_type_count", 2)
    config.setdefault("pad_token_id", 0)
    return config


_POOLING = {
    PoolingType.MEAN: "pooling_mode_mean_tokens",
    PoolingType.CLS: "pooling_mode_cls_token",
    PoolingType.LAST: "pooling_mode_lasttoken",
}


def _files(m: Meta, config: dict[str, Any]) -> dict[str, Any]:
    """sentence-transformers' modules.json and pooling config, as `pooling` reads them."""
    mode = _POOLING.get(m.of_arch("pooling_type"))
    if mode is None:
        return {}
    return {
        "modules.json": [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {
                "idx": 1,
                "name": "1",
                "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling",
            },
        ],
        "1_Pooling/config.json": {
            "word_embedding_dimension": config["hidden_size"],
            **{key: key == mode for key in _POOLING.values()},
        },
    }


FAMILY = Family(MODEL_ARCH.BERT, _params, _vocab, _tensors, Reverse(_config, _names, files=_files))
