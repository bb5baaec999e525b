"""`xllm convert MODEL.gguf OUTDIR`: a GGUF file back to a Hugging Face folder (config.json,
model.safetensors, tokenizer.json, tokenizer_config.json), with no torch.

The weights: F32, F16 and BF16 tensors are copied bit for bit; quantized ones (Q4_K, Q8_0,
IQ...) are dequantized by gguf's numpy code to F32, which holds every value the quantized
blocks stand for exactly (the weights as they were before quantization are gone, so this is
the quantized model, not the original one). `outtype` casts every tensor to one type instead
(F16 and BF16 round). What llama.cpp's converter did to a tensor is undone by its family:
llama's q/k permutation (exact), Gemma's norm + 1 (F32 arithmetic: within an ulp of the norm
+ 1). The folder is written under a temporary name beside OUTDIR and renamed at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, ReaderTensor, quants

from xllm.models.convert import bert, gemma3, hf_tokenizer, llama, weights
from xllm.models.convert.meta import Meta
from xllm.models.convert.writer import Family, unrenamer
from xllm.models.safetensors import SafetensorsError

FAMILIES: dict[str, Family] = {
    MODEL_ARCH_NAMES[f.arch]: f
    for f in (bert.FAMILY, llama.LLAMA_FAMILY, llama.QWEN2_FAMILY, gemma3.FAMILY)
}
"""GGUF's `general.architecture` -> the family that converts it back."""
_DERIVED = ("rope_freqs.weight",)
"""Tensors the converter computes from config.json (which says how to make them again)."""
OUTTYPES = {"f32": "F32", "f16": "F16", "bf16": "BF16"}
_KEEP = {
    GGMLQuantizationType.F32: "F32",
    GGMLQuantizationType.F16: "F16",
    GGMLQuantizationType.BF16: "BF16",
}


def _bf16(array: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """F32 -> BF16 bits, rounded to nearest even (as torch does)."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def _values(t: ReaderTensor) -> npt.NDArray[Any]:
    """The tensor in Hugging Face's shape: F32/F16 as stored, the rest as F32."""
    shape = tuple(int(d) for d in reversed(t.shape))
    data = np.asarray(t.data)
    if t.tensor_type == GGMLQuantizationType.BF16:  # its bits are the top half of an F32's
        return (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return data.reshape(shape)
    try:
        return quants.dequantize(data, t.tensor_type).reshape(shape)
    except NotImplementedError:
        raise SafetensorsError(
            f"tensor {t.name}: gguf cannot dequantize type {t.tensor_type.name}"
        ) from None


def convert_gguf(
    path: Path,
    out: Path,
    outtype: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[str, int]:
    """Write the Hugging Face folder of the GGUF at `path` to `out` (which must not exist or
    be empty); the GGUF's architecture and the number of tensors written."""
    if outtype is not None and outtype not in OUTTYPES:
        raise SafetensorsError(
            f"outtype {outtype!r}: a safetensors folder takes {', '.join(OUTTYPES)}"
        )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SafetensorsError(f"{out} exists: give a new folder to write the model to")
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SafetensorsError(f"{path}: not a GGUF file ({e})") from None
    m = Meta({k: f.contents() for k, f in reader.fields.items()})
    if m.arch not in FAMILIES:
        raise SafetensorsError(
            f"architecture {m.arch!r} cannot be converted back; xllm converts {', '.join(FAMILIES)}"
        )
    if (experts := m.of_arch("expert_count", 0)) > 1:
        raise SafetensorsError(
            f"a {m.arch} GGUF with {experts} experts (a mixture of experts) cannot be converted "
            f"back; xllm converts the dense {', '.join(FAMILIES)}"
        )
    if m.get("split.count", 1) != 1:
        raise SafetensorsError(f"{path}: one part of a split GGUF (join it with gguf-split)")
    family = FAMILIES[m.arch]
    tensors = [t for t in reader.tensors if t.name not in _DERIVED]
    try:
        config = family.reverse.config(m, {t.name: t for t in reader.tensors})
        back = unrenamer(family.arch, config["num_hidden_layers"], family.reverse.names(config))
    except KeyError as e:
        raise SafetensorsError(f"{path}: no GGUF key gives config.json's {e.args[0]!r}") from None
    files = {"config.json": config, **family.reverse.files(m, config), **hf_tokenizer.files(m)}
    if unknown := [t.name for t in tensors if t.name not in back]:
        raise SafetensorsError(f"tensor {unknown[0]} has no Hugging Face name in a {m.arch} model")
    source = [_KEEP.get(t.tensor_type, "F32") for t in tensors]
    types = [OUTTYPES[outtype] if outtype else s for s in source]
    config["torch_dtype"] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}[
        max(set(types), key=types.count)
    ]
    specs = [
        (back[t.name], dtype, tuple(int(d) for d in reversed(t.shape)))
        for t, dtype in zip(tensors, types, strict=True)
    ]
    total = sum(int(t.n_bytes) for t in tensors)

    def data() -> Iterator[npt.NDArray[Any]]:
        done = 0
        for t, (name, dtype, _) in zip(tensors, specs, strict=True):
            array = family.reverse.untransform(name, _values(t), config)
            yield _bf16(array) if dtype == "BF16" else array  # weights.write casts the others
            done += int(t.n_bytes)
            if progress is not None:
                progress(done, total)

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        weights.write(tmp / "model.safetensors", specs, data())
        for name, value in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
            (tmp / name).write_text(text, encoding="utf-8")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return m.arch, len(specs)
