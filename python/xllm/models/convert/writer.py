"""What every architecture's GGUF shares: the hyperparameters config.json names the same way
for all of them, the choice of each tensor's type, and the writing itself.

The choices follow llama.cpp's `convert_hf_to_gguf.py`: 1-D tensors, norms, biases, position
and token-type embeddings stay F32 (llama.cpp's kernels want them so); the other weights take
the output type, and a tensor Q8_0 cannot hold (rows not a multiple of 32) falls back to F16.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import (
    GGML_QUANT_VERSION,
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    PoolingType,
    QuantError,
    ReaderTensor,
    get_tensor_name_map,
    quants,
)

from xllm.models.convert.meta import Meta
from xllm.models.safetensors import SafetensorsError

OUTTYPES = {
    "f32": (LlamaFileType.ALL_F32, GGMLQuantizationType.F32),
    "f16": (LlamaFileType.MOSTLY_F16, GGMLQuantizationType.F16),
    "bf16": (LlamaFileType.MOSTLY_BF16, GGMLQuantizationType.BF16),
    "q8_0": (LlamaFileType.MOSTLY_Q8_0, GGMLQuantizationType.Q8_0),
}
"""`--outtype`: the GGUF file type and the type of the weights that take it."""
_ALWAYS_F32 = ("position_embd.weight", "token_types.weight")

Tensors = Iterable[tuple[str, npt.NDArray[Any]]]
"""(GGUF name, array) pairs."""


def _unchanged(name: str, array: npt.NDArray[Any], config: dict[str, Any]) -> npt.NDArray[Any]:
    return array


def _no_files(m: Meta, config: dict[str, Any]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Reverse:
    """How one family's GGUF goes back to a Hugging Face folder."""

    config: Callable[[Meta, Mapping[str, ReaderTensor]], dict[str, Any]]
    """config.json from the GGUF's keys and its tensors (by name)."""
    names: Callable[[dict[str, Any]], list[str]]
    """Every Hugging Face tensor name such a model may have (their GGUF names, given by the
    family's renaming, are looked up the other way)."""
    untransform: Callable[[str, npt.NDArray[Any], dict[str, Any]], npt.NDArray[Any]] = _unchanged
    """Undo what `Family.tensors` did to a tensor's values (by its Hugging Face name)."""
    files: Callable[[Meta, dict[str, Any]], dict[str, Any]] = _no_files
    """Other JSON files of the folder (sentence-transformers' pooling), by path."""


@dataclass(frozen=True)
class Family:
    """How one family of architectures becomes GGUF."""

    arch: MODEL_ARCH
    params: Callable[[GGUFWriter, dict[str, Any], Path], None]
    """Write the family's own keys (after `common_params`)."""
    vocab: Callable[[GGUFWriter, dict[str, Any], Path], None]
    tensors: Callable[[Tensors, dict[str, Any]], Tensors]
    """Hugging Face (name, array) pairs -> GGUF ones (renamed, permuted, dropped)."""
    reverse: Reverse


def renamer(arch: MODEL_ARCH, blocks: int) -> Callable[[str], str]:
    """Hugging Face tensor name -> GGUF's (gguf's table for the architecture)."""
    table = get_tensor_name_map(arch, blocks)

    def rename(name: str) -> str:
        new = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SafetensorsError(f"tensor {name!r} has no GGUF name for this architecture")
        return new

    return rename


def unrenamer(arch: MODEL_ARCH, blocks: int, names: list[str]) -> dict[str, str]:
    """GGUF tensor name -> the Hugging Face name among `names` that `renamer` turns into it."""
    table = get_tensor_name_map(arch, blocks)
    back: dict[str, str] = {}
    for name in names:
        new = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is not None:
            back.setdefault(new, name)
    return back


def find(config: dict[str, Any], *keys: str) -> Any:
    """The first of `keys` config.json has (its names differ between models), else None."""
    return next((config[k] for k in keys if config.get(k) is not None), None)


def common_params(w: GGUFWriter, config: dict[str, Any]) -> None:
    """The hyperparameters every family writes, under whichever name config.json gives them."""
    w.add_block_count(config["num_hidden_layers"])
    for add, keys in (
        (w.add_context_length, ("max_position_embeddings", "n_ctx", "n_positions")),
        (w.add_embedding_length, ("hidden_size", "n_embd")),
        (w.add_feed_forward_length, ("intermediate_size", "n_inner")),
        (w.add_head_count, ("num_attention_heads", "n_head")),
        (w.add_head_count_kv, ("num_key_value_heads", "n_kv_heads")),
        (w.add_rope_freq_base, ("rope_theta",)),
        (w.add_layer_norm_rms_eps, ("rms_norm_eps",)),
        (w.add_layer_norm_eps, ("layer_norm_eps", "layer_norm_epsilon")),
    ):
        value = find(config, *keys)
        if value is not None:
            add(value)
    if (head_dim := config.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)


def pooling(w: GGUFWriter, folder: Path) -> None:
    """sentence-transformers' pooling (modules.json -> its Pooling module's config.json)."""
    modules = folder / "modules.json"
    if not modules.is_file():
        return
    path = next(
        (m.get("path", "") for m in json.loads(modules.read_bytes())
         if m.get("type") == "sentence_transformers.models.Pooling"),
        None,
    )  # fmt: skip
    if path is None or not (folder / path / "config.json").is_file():
        return
    mode = json.loads((folder / path / "config.json").read_bytes())
    for key, kind in (("pooling_mode_mean_tokens", PoolingType.MEAN),
                      ("pooling_mode_cls_token", PoolingType.CLS),
                      ("pooling_mode_lasttoken", PoolingType.LAST)):  # fmt: skip
        if mode.get(key):
            w.add_pooling_type(kind)
            return
    raise SafetensorsError(f"{path}/config.json: only mean, CLS and last-token pooling convert")


def tensor_type(
    name: str, array: npt.NDArray[Any], weights: GGMLQuantizationType
) -> GGMLQuantizationType:
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLQuantizationType.F32
    if name in _ALWAYS_F32:
        return GGMLQuantizationType.F32
    return weights


def encode(
    name: str, array: npt.NDArray[Any], weights: GGMLQuantizationType
) -> tuple[npt.NDArray[Any], GGMLQuantizationType]:
    """The tensor's data in the type it is stored as."""
    kind = tensor_type(name, array, weights)
    data = np.asarray(array, dtype=np.float32)
    try:
        return quants.quantize(data, kind), kind
    except QuantError:
        return quants.quantize(data, GGMLQuantizationType.F16), GGMLQuantizationType.F16


def header(w: GGUFWriter, name: str, file_type: LlamaFileType) -> None:
    w.add_type("model")
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(GGML_QUANT_VERSION)
