"""Hugging Face model folders (safetensors weights, config.json, tokenizer files): which files
belong to one, and what `show` and `list` tell about it without loading it.

The facts come from config.json and the safetensors headers (8 bytes of little-endian length,
then a JSON object of tensor name -> dtype, shape, offsets); the weights are never read.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from xllm.errors import InvalidRequest
from xllm.models.summary import Summary

FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.txt",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
        "chat_template.json",
        "model.safetensors.index.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
        "1_Pooling/config.json",
    }
)
"""Every file of a model folder besides its weights (sentence-transformers' included)."""
_WEIGHTS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.safetensors")
"""Weights files: top level only, a plain name (no `/`, cannot start with `.`)."""
MAX_HEADER = 100 << 20
MAX_JSON = 16 << 20
ENCODERS = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra", "camembert",
     "deberta", "deberta-v2", "nomic_bert", "modernbert", "new", "t5encoder"}
)  # fmt: skip
"""`model_type`s of encoder-only models: they embed, they do not generate."""
_GGUF_KEYS = {"context_length": "max_position_embeddings", "embedding_length": "hidden_size",
              "block_count": "num_hidden_layers"}  # fmt: skip
"""config.json's fields under GGUF's `<arch>.<key>` names (where `show` looks for them)."""


class SafetensorsError(InvalidRequest):
    """A model folder that is not what it claims to be (a bad header, a bad config.json)."""


def is_weights(name: str) -> bool:
    return _WEIGHTS.fullmatch(name) is not None


def is_model_file(name: str) -> bool:
    """A name a model folder may hold: a fixed list, so none can leave the folder."""
    return name in FILES or is_weights(name)


def read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, its length bounded by the file and MAX_HEADER."""
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path.name}: too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, path.stat().st_size - 8):
            raise SafetensorsError(f"{path.name}: header length {length} is out of range")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SafetensorsError(f"{path.name}: the header is not JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path.name}: the header is not a JSON object")
    return header


def _tensors(path: Path) -> list[tuple[str, int]]:
    """(dtype, element count) of every tensor in a safetensors file."""
    out = []
    for name, t in read_header(path).items():
        if name == "__metadata__":
            continue
        shape = t.get("shape") if isinstance(t, dict) else None
        dtype = t.get("dtype") if isinstance(t, dict) else None
        if not isinstance(dtype, str) or not isinstance(shape, list):
            raise SafetensorsError(f"{path.name}: tensor {name[:100]!r} has no dtype or shape")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise SafetensorsError(f"{path.name}: tensor {name[:100]!r} has a bad shape")
        out.append((dtype, math.prod(shape)))
    return out


def _json(path: Path) -> Any:
    with path.open("rb") as f:
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise SafetensorsError(f"{path.name} is larger than {MAX_JSON} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise SafetensorsError(f"{path.name} is not JSON") from None


def _int(config: dict[str, Any], key: str) -> int:
    value = config.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def summarize(files: Mapping[str, Path]) -> Summary:
    """The facts of a model folder given as name -> file; SafetensorsError for a bad one."""
    if "config.json" not in files:
        raise SafetensorsError("the model has no config.json")
    config = _json(files["config.json"])
    if not isinstance(config, dict):
        raise SafetensorsError("config.json is not a JSON object")
    weights = sorted(n for n in files if is_weights(n))
    if not weights:
        raise SafetensorsError("the model has no safetensors file")
    by_dtype: Counter[str] = Counter()
    for name in weights:
        for dtype, count in _tensors(files[name]):
            by_dtype[dtype] += count
    params = sum(by_dtype.values())
    archs = config.get("architectures")
    model_type = config.get("model_type")
    model_type = model_type if isinstance(model_type, str) else ""
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    template = _chat_template(files)
    encoder = model_type in ENCODERS or "modules.json" in files
    capabilities = ["embedding"] if encoder else ["completion"]
    if template and not encoder:
        capabilities.append("chat")
    if isinstance(config.get("vision_config"), dict):  # LLaVA, Gemma 3, Qwen-VL... folders
        capabilities.append("vision")
    info = {k: v for k, v in config.items() if isinstance(v, (str, int, float, bool))}
    info["general.architecture"] = model_type or arch or "unknown"
    info["general.parameter_count"] = params
    prefix = info["general.architecture"]
    for key, field in _GGUF_KEYS.items():
        if _int(config, field):
            info[f"{prefix}.{key}"] = _int(config, field)
    return Summary(
        architecture=arch or model_type or "unknown",
        parameter_count=params,
        quantization=by_dtype.most_common(1)[0][0] if by_dtype else "unknown",
        context_length=_int(config, "max_position_embeddings"),
        embedding_length=_int(config, "hidden_size"),
        block_count=_int(config, "num_hidden_layers"),
        capabilities=capabilities,
        chat_template=template,
        license=None,
        head_count=_int(config, "num_attention_heads") or None,
        head_count_kv=_int(config, "num_key_value_heads") or None,
        model_info=info,
        format="safetensors",
    )


def _chat_template(files: Mapping[str, Path]) -> str | None:
    """tokenizer_config.json's `chat_template` (a string), else chat_template.jinja."""
    if "tokenizer_config.json" in files:
        tokenizer = _json(files["tokenizer_config.json"])
        template = tokenizer.get("chat_template") if isinstance(tokenizer, dict) else None
        if isinstance(template, str) and template:
            return template
    if "chat_template.jinja" in files:
        text = files["chat_template.jinja"].read_bytes()[:MAX_JSON].decode("utf-8", "replace")
        return text or None
    return None
