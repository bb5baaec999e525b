"""A GGUF file's metadata, read on the way back to a Hugging Face folder: its keys (those under
the architecture's prefix by their short name), and the config.json fields every family
shares, under the names Hugging Face gives them."""

from __future__ import annotations

from typing import Any

import numpy as np


class Meta:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.fields = fields
        self.arch = str(fields.get("general.architecture", ""))

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)

    def of_arch(self, key: str, default: Any = None) -> Any:
        """`<arch>.<key>` (`llama.block_count`)."""
        return self.fields.get(f"{self.arch}.{key}", default)

    def token_id(self, kind: str) -> int | None:
        """`tokenizer.ggml.<kind>_token_id` (bos, eos, unknown, padding, seperator)."""
        value = self.fields.get(f"tokenizer.ggml.{kind}_token_id")
        return None if value is None else int(value)


def short(value: float) -> float:
    """A float GGUF stored as F32, written as the shortest decimal that is that F32
    (9.999999747378752e-06 -> 1e-05), as config.json had it."""
    return float(str(np.float32(value)))


_COMMON = {
    "num_hidden_layers": "block_count",
    "max_position_embeddings": "context_length",
    "hidden_size": "embedding_length",
    "intermediate_size": "feed_forward_length",
    "num_attention_heads": "attention.head_count",
    "num_key_value_heads": "attention.head_count_kv",
    "rope_theta": "rope.freq_base",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon",
    "layer_norm_eps": "attention.layer_norm_epsilon",
    "head_dim": "attention.key_length",
}
"""config.json field -> the GGUF key (after `<arch>.`) the converter writes it as."""


def common_config(m: Meta) -> dict[str, Any]:
    """The fields of `writer.common_params`, back; special token ids and the vocabulary size."""
    config: dict[str, Any] = {}
    for field, key in _COMMON.items():
        value = m.of_arch(key)
        if value is not None:
            config[field] = short(value) if isinstance(value, float) else int(value)
    config["vocab_size"] = len(m.get("tokenizer.ggml.tokens", []))
    for field, kind in (
        ("bos_token_id", "bos"),
        ("eos_token_id", "eos"),
        ("pad_token_id", "padding"),
    ):
        if (value := m.token_id(kind)) is not None:
            config[field] = value
    return config
