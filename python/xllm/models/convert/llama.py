"""Decoder-only transformers with llama's layout: `llama` (Llama, Mistral, SmolLM) and `qwen2`.

llama's q and k projections are permuted as llama.cpp's converter does (Hugging Face's rotary
embedding pairs dimension i with i + d/2, GGUF's llama with i + 1); qwen2's are not (llama.cpp
runs it in Hugging Face's order). Only a BPE tokenizer.json converts (SentencePiece models need
`tokenizer.model` and sentencepiece, which xllm does not depend on).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import MODEL_ARCH, GGUFWriter, RopeScalingType

from xllm.models.convert import vocab
from xllm.models.convert.writer import Family, Tensors, common_params, pooling, renamer
from xllm.models.safetensors import SafetensorsError

LLAMA = ("LlamaForCausalLM", "LLaMAForCausalLM", "MistralForCausalLM")
QWEN2 = ("Qwen2ForCausalLM",)


def _llama_params(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    common_params(w, config)
    w.add_vocab_size(config["vocab_size"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    w.add_rope_dimension_count(head_dim)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear" and "factor" in scaling:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])


def _qwen2_params(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    common_params(w, config)
    pooling(w, folder)
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "yarn" and "factor" in scaling:
        w.add_rope_scaling_type(RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def _bpe_vocab(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    if not (folder / "tokenizer.json").is_file():
        raise SafetensorsError(
            f"{folder}: no tokenizer.json (a SentencePiece tokenizer.model does not convert)"
        )
    vocab.write(w, folder, "gpt2", vocab.load(folder, config.get("vocab_size")), merges=True)


def permute(weights: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """Rows of each head from Hugging Face's rotary layout (halves) to GGUF's (pairs)."""
    shape = weights.shape
    return np.ascontiguousarray(
        weights.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _llama_tensors(tensors: Tensors, config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    rename = renamer(MODEL_ARCH.LLAMA, config["num_hidden_layers"])
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    for name, array in tensors:
        if name.endswith(".rotary_emb.inv_freq"):
            continue
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            array = permute(array, heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            array = permute(array, kv_heads)
        yield rename(name), array


def _qwen2_tensors(tensors: Tensors, config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    rename = renamer(MODEL_ARCH.QWEN2, config["num_hidden_layers"])
    for name, array in tensors:
        if not name.endswith(".rotary_emb.inv_freq"):
            yield rename(name), array


LLAMA_FAMILY = Family(MODEL_ARCH.LLAMA, _llama_params, _bpe_vocab, _llama_tensors)
QWEN2_FAMILY = Family(MODEL_ARCH.QWEN2, _qwen2_params, _bpe_vocab, _qwen2_tensors)
