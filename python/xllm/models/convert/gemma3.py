"""Gemma 3's text model (`Gemma3ForCausalLM`, the 270M to 27B ones; a multimodal
`Gemma3ForConditionalGeneration` converts its language model only).

As llama.cpp's converter does: every RMS norm weight is stored plus one (Hugging Face's Gemma
norm multiplies by 1 + w, llama.cpp's by w), the embeddings are tied (no `lm_head`), and the
vocabulary is SentencePiece's (`tokenizer.ggml.model` `llama`: tokens, scores, types) with no
space prefix, read here from tokenizer.json (Gemma's is BPE with byte fallback). What llama.cpp
fixes for gemma3 and so is not in the GGUF (sliding window pattern 6, local rope base 10000,
the attention scale) is written back as Gemma's config.json has it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import MODEL_ARCH, GGUFWriter, ReaderTensor, RopeScalingType

from xllm.models.convert import vocab
from xllm.models.convert.llama import decoder_names
from xllm.models.convert.meta import Meta, common_config, short
from xllm.models.convert.writer import Family, Reverse, Tensors, common_params, renamer
from xllm.models.safetensors import SafetensorsError

ARCHITECTURES = ("Gemma3ForCausalLM", "Gemma3ForConditionalGeneration")
_DEFAULTS = {
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-6,
    "head_dim": 256,
    "rope_theta": 1_000_000.0,
    "num_attention_heads": 8,
}
"""Hugging Face's Gemma3TextConfig defaults, for keys a config.json leaves out."""
_DROPPED = ("vision_tower.", "multi_modal_projector.", "lm_head.")
_SWA_PATTERN = 6
"""Every sixth layer attends globally, the others in the sliding window (llama.cpp's
`set_swa_pattern(6)`)."""


def _params(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    config = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    common_params(w, config)
    w.add_sliding_window(config["sliding_window"])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) == "linear" and "factor" in scaling:
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])


def _vocab(w: GGUFWriter, config: dict[str, Any], folder: Path) -> None:
    v = vocab.load(folder, config.get("vocab_size"), bpe=False)
    scores = vocab.spm(folder, v)
    normalizer = json.loads((folder / "tokenizer.json").read_bytes()).get("normalizer") or {}
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(v.tokens)
    w.add_token_scores(scores)
    w.add_token_types(v.types)
    w.add_add_space_prefix("Prepend" in json.dumps(normalizer))
    vocab.special(w, folder, len(v.tokens), merges=False)


def _tensors(tensors: Tensors, config: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    rename = renamer(MODEL_ARCH.GEMMA3, config["num_hidden_layers"])
    for name, array in tensors:
        name = name.replace("language_model.", "")
        if name.startswith(_DROPPED) or name.endswith(".rotary_emb.inv_freq"):
            continue
        if name.endswith("norm.weight"):
            array = np.asarray(array, np.float32) + 1
        yield rename(name), array


def _config(m: Meta, tensors: Mapping[str, ReaderTensor]) -> dict[str, Any]:
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        **common_config(m),
    }
    if "output.weight" in tensors:
        raise SafetensorsError("a gemma3 GGUF with its own output tensor: Gemma ties them")
    config.setdefault("head_dim", _DEFAULTS["head_dim"])
    layers = config["num_hidden_layers"]
    # llama.cpp scales attention by head_dim^-0.5, but the 27B one (62 layers) by
    # (hidden/heads)^-0.5: Gemma's query_pre_attn_scalar
    scalar = config["hidden_size"] // config["num_attention_heads"] if layers == 62 else None
    config.update(
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=scalar or config["head_dim"],
        sliding_window=m.of_arch("attention.sliding_window"),
        rope_local_base_freq=10000.0,
        layer_types=[
            "full_attention" if (i + 1) % _SWA_PATTERN == 0 else "sliding_attention"
            for i in range(layers)
        ],
        attention_bias=False,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
        tie_word_embeddings=True,
    )
    if m.of_arch("rope.scaling.type") == "linear":
        config["rope_scaling"] = {
            "rope_type": "linear",
            "factor": short(m.of_arch("rope.scaling.factor")),
        }
    return config


def _names(config: dict[str, Any]) -> list[str]:
    return decoder_names(
        config,
        "self_attn.q_norm.weight",
        "self_attn.k_norm.weight",
        "pre_feedforward_layernorm.weight",
        "post_feedforward_layernorm.weight",
    )


def _untransform(name: str, array: npt.NDArray[Any], config: dict[str, Any]) -> Any:
    return np.asarray(array, np.float32) - 1 if name.endswith("norm.weight") else array


FAMILY = Family(
    MODEL_ARCH.GEMMA3, _params, _vocab, _tensors, Reverse(_config, _names, _untransform)
)
