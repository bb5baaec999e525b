"""A transformer's shape: what the memory plan needs to know about a model, from a GGUF header,
a Hugging Face `config.json`, or numbers the user types.

The parameter count of a `config.json` model is estimated from its matrices (configs do not
state it): embeddings (twice unless tied), attention (query and output at full width, key and
value at the KV heads' width) and a gated MLP (three matrices, per expert for a mixture).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from xllm.errors import InvalidRequest
from xllm.memory.planner import n_vocab
from xllm.models.gguf import GGUF


@dataclass(frozen=True)
class Shape:
    params: int
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context_length: int | None
    """The context the model was trained for (None: unknown)."""

    @property
    def gqa(self) -> bool:
        return self.kv_heads < self.heads

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """K and V of one token in every layer: 2 x layers x KV heads x head dim x bytes."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_element

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"gqa": self.gqa}


def from_gguf(g: GGUF) -> Shape:
    layers = g.arch_int("block_count")
    hidden = g.arch_int("embedding_length")
    heads = g.arch_int("attention.head_count", 1)  # per-layer counts: the largest
    kv_heads = g.arch_int("attention.head_count_kv", heads)
    head_dim = g.arch_int("attention.key_length") or hidden // max(heads, 1)
    return Shape(
        params=sum(math.prod(t.dims) for t in g.tensors),
        layers=layers,
        hidden_size=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=n_vocab(g),
        context_length=g.arch_int("context_length") or None,
    )


_KEYS = {
    "layers": ("num_hidden_layers", "n_layer", "num_layers", "n_layers"),
    "hidden_size": ("hidden_size", "n_embd", "d_model", "dim"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "n_head_kv", "num_kv_heads", "n_kv_heads"),
    "head_dim": ("head_dim",),
    "vocab": ("vocab_size", "padded_vocab_size"),
    "intermediate": ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim"),
    "context_length": ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"),
    "experts": ("num_local_experts", "num_experts", "n_routed_experts"),
}


def _get(cfg: dict[str, Any], what: str) -> int | None:
    for key in _KEYS[what]:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def from_hf_config(cfg: dict[str, Any], where: str = "config.json") -> Shape:
    """The shape of a Hugging Face model (a multimodal model's language part: `text_config`)."""
    text = cfg.get("text_config")
    if isinstance(text, dict):
        cfg = {**cfg, **text}
    layers, hidden, heads = _get(cfg, "layers"), _get(cfg, "hidden_size"), _get(cfg, "heads")
    missing = [
        n for n, v in (("layers", layers), ("hidden_size", hidden), ("heads", heads)) if not v
    ]
    if layers is None or hidden is None or heads is None:
        raise InvalidRequest(
            f"{where} has no {', '.join(missing)} (not a transformer config?)", param="hf"
        )
    kv_heads = _get(cfg, "kv_heads") or heads
    head_dim = _get(cfg, "head_dim") or hidden // heads
    vocab = _get(cfg, "vocab") or 32000
    ffn = _get(cfg, "intermediate") or 4 * hidden
    experts = _get(cfg, "experts") or 1
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
    params = embeddings + layers * (attention + experts * 3 * hidden * ffn)
    return Shape(
        params=params,
        layers=layers,
        hidden_size=hidden,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        vocab=vocab,
        context_length=_get(cfg, "context_length"),
    )
