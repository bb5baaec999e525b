"""Decoder-only transformers with llama's layout: `llama` (Llama, Mistral, SmolLM) and `qwen2`.

llama's q and k projections are permuted as llama.cpp's converter does (Hugging Face's rotary
embedding pairs dimension i with i + d/2, GGUF's llama with i + 1); qwen2's are not (llama.cpp
runs it in Hugging Face's order). Only a BPE tokenizer.json converts (SentencePiece models need
`tokenizer.model` and sentencepiece, which xllm does not depend on).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import MODEL_ARCH, GGUFWriter, ReaderTensor, RopeScalingType

from xllm.models.convert import rope, vocab
from xllm.models.convert.meta import Meta, common_config, short
from xllm.models.convert.writer import Family, Reverse, Tensors, common_params, pooling, renamer
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


def unpermute(weights: npt.NDArray[Any], heads: int) -> npt.NDArray[Any]:
    """`permute` undone: rows of each head from GGUF's rotary layout back to Hugging Face's."""
    shape = weights.shape
    return np.ascontiguousarray(
        weights.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
    )


def _llama_tensors(tensors: Tensors, config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    if (freqs := rope.factors(config)) is not None:
        yield "rope_freqs.weight", freqs
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


def decoder_names(config: dict[str, Any], *block: str) -> list[str]:
    """Hugging Face's tensor names of a llama-like decoder, with `block`'s in each layer."""
    layer = (
        "input_layernorm.weight", "post_attention_layernorm.weight",
        *(f"self_attn.{p}_proj.{k}" for p in "qkvo" for k in ("weight", "bias")),
        *(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")), *block,
    )  # fmt: skip
    layers = range(config["num_hidden_layers"])
    return ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            *(f"model.layers.{i}.{name}" for i in layers for name in layer)]  # fmt: skip


def _decoder_config(
    m: Meta, tensors: Mapping[str, ReaderTensor], arch: str, model_type: str
) -> dict[str, Any]:
    config = {"architectures": [arch], "model_type": model_type, **common_config(m)}
    config["hidden_act"] = "silu"
    config["tie_word_embeddings"] = "output.weight" not in tensors
    config.setdefault("rope_theta", 10000.0)
    return config


def _llama_config(m: Meta, tensors: Mapping[str, ReaderTensor]) -> dict[str, Any]:
    config = _decoder_config(m, tensors, "LlamaForCausalLM", "llama")
    config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    if m.of_arch("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear",
                                  "factor": short(m.of_arch("rope.scaling.factor"))}  # fmt: skip
    if "rope_freqs.weight" in tensors:
        config["rope_scaling"] = rope.scaling(np.asarray(tensors["rope_freqs.weight"].data), config)
    return config


def _llama_untransform(name: str, array: npt.NDArray[Any], config: dict[str, Any]) -> Any:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return unpermute(array, config["num_attention_heads"])
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return unpermute(array, config.get("num_key_value_heads") or config["num_attention_heads"])
    return array


def _qwen2_config(m: Meta, tensors: Mapping[str, ReaderTensor]) -> dict[str, Any]:
    config = _decoder_config(m, tensors, "Qwen2ForCausalLM", "qwen2")
    if m.of_arch("rope.scaling.type") == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn",
            "factor": short(m.of_arch("rope.scaling.factor")),
            "original_max_position_embeddings": m.of_arch("rope.scaling.original_context_length"),
        }
    return config


LLAMA_FAMILY = Family(MODEL_ARCH.LLAMA, _llama_params, _bpe_vocab, _llama_tensors,
                      Reverse(_llama_config, decoder_names, _llama_untransform))  # fmt: skip
QWEN2_FAMILY = Family(MODEL_ARCH.QWEN2, _qwen2_params, _bpe_vocab, _qwen2_tensors,
                      Reverse(_qwen2_config, decoder_names))  # fmt: skip
