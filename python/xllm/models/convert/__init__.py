"""`xllm convert`: a Hugging Face safetensors folder -> one GGUF file, with no torch (and
back: hf_folder.py).

config.json's `architectures[0]` picks the family (FAMILIES); the weights stream from the
safetensors files (weights.py) through the family's renaming into gguf's writer, the
vocabulary comes from tokenizer.json (vocab.py). The file is written under a temporary name
next to OUT and renamed at the end, so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFWriter, LlamaFileType

from xllm.models.convert import bert, gemma3, llama, weights, writer
from xllm.models.convert.writer import OUTTYPES, Family
from xllm.models.safetensors import SafetensorsError

FAMILIES: dict[str, Family] = {
    **dict.fromkeys(bert.ARCHITECTURES, bert.FAMILY),
    **dict.fromkeys(llama.LLAMA, llama.LLAMA_FAMILY),
    **dict.fromkeys(llama.QWEN2, llama.QWEN2_FAMILY),
    **dict.fromkeys(gemma3.ARCHITECTURES, gemma3.FAMILY),
}
"""config.json's `architectures[0]` -> how it converts."""

Progress = Callable[[int, int], None]
"""Called with (bytes of tensors written, total bytes)."""


class UnsupportedArchitecture(SafetensorsError):
    """A model whose architecture xllm cannot convert."""


@dataclass
class Converted:
    path: Path
    architecture: str
    """GGUF's name of it (`bert`, `llama`, `qwen2`)."""
    tensors: int


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise SafetensorsError(f"{folder}: not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(path.read_bytes())
    except ValueError:
        raise SafetensorsError(f"{path}: not JSON") from None
    if not isinstance(config, dict):
        raise SafetensorsError(f"{path}: not a JSON object")
    return {**config, **(config.get("text_config") or {})}


_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")
"""config.json's count of experts (Mixtral, Qwen MoE, DeepSeek): a mixture of experts."""


def family_of(config: dict[str, Any]) -> Family:
    archs = config.get("architectures") or [config.get("model_type", "unknown")]
    arch = str(archs[0])
    experts = writer.find(config, *_EXPERTS)
    moe = isinstance(experts, int) and experts > 1
    if arch not in FAMILIES or moe:
        what = f"a mixture of {experts} experts" if moe else "its architecture"
        raise UnsupportedArchitecture(
            f"{arch!r} cannot be converted ({what}); xllm converts the dense {', '.join(FAMILIES)}"
        )
    return FAMILIES[arch]


def convert(
    folder: Path, out: Path, outtype: str = "f16", progress: Progress | None = None
) -> Converted:
    """Write the GGUF of the model in `folder` to `out`; `progress` hears of the weights read
    (converting them is the slow part; writing the file is one sequential pass)."""
    if outtype not in OUTTYPES:
        raise SafetensorsError(f"outtype {outtype!r}: choose one of {', '.join(OUTTYPES)}")
    file_type, weight_type = OUTTYPES[outtype]
    config = read_config(folder)
    family = family_of(config)
    try:
        return _write(folder, out, config, family, file_type, weight_type, progress)
    except KeyError as e:  # a config.json key or a tensor the family needs
        raise SafetensorsError(
            f"{folder}: {e.args[0]!r} is missing, and a {MODEL_ARCH_NAMES[family.arch]} "
            "model needs it"
        ) from None
    except (TypeError, ValueError, struct.error) as e:  # struct: gguf packing a wrong type
        raise SafetensorsError(f"{folder}: a value in config.json is malformed: {e}") from None


def _write(
    folder: Path,
    out: Path,
    config: dict[str, Any],
    family: Family,
    file_type: LlamaFileType,
    weight_type: GGMLQuantizationType,
    progress: Progress | None,
) -> Converted:
    w = GGUFWriter(None, MODEL_ARCH_NAMES[family.arch])
    writer.header(w, folder.name, file_type)
    family.params(w, config, folder)
    family.vocab(w, config, folder)
    total = sum(p.stat().st_size for p in weights.files(folder))
    done = 0
    for name, array in family.tensors(weights.read(folder), config):
        data, kind = writer.encode(name, array, weight_type)
        w.add_tensor(name, data, raw_dtype=kind)
        done += array.nbytes
        if progress is not None:
            progress(min(done, total), total)
    if progress is not None:  # dropped tensors (a pooler...) were never counted as done
        progress(total, total)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return Converted(out, MODEL_ARCH_NAMES[family.arch], len(w.tensors[0]))
