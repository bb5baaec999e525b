"""Diffusion models as files: what stable-diffusion.cpp loads, and what `show` and `list` tell
about them without loading them.

A diffusion model is a folder of parts, each file named by the part it is (the names are
stable-diffusion.cpp's own flags, without `_path`), as GGUF or safetensors:

    model.gguf             a whole checkpoint (SD 1.x, SDXL...: UNet, text encoders, VAE)
    diffusion_model.gguf   a diffusion model alone (FLUX, SD3, Z-Image...)
    clip_l / clip_g / t5xxl / llm   its text encoders
    vae / taesd            its decoder (a tiny one, TAESD, decodes faster and worse)

A model has `model` or `diffusion_model` and at most one file per part. The architecture is
stable-diffusion.cpp's name for the family its diffusion weights' tensor names say (as its
`get_sd_version` tells them apart); parameters count every part.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from xllm.errors import InvalidRequest
from xllm.models import gguf, safetensors
from xllm.models.summary import Summary

PARTS = ("model", "diffusion_model", "clip_l", "clip_g", "t5xxl", "llm", "vae", "taesd")
"""The parts a diffusion model may have, as stable-diffusion.cpp names its files."""
_FILE = re.compile(rf"({'|'.join(PARTS)})\.(gguf|safetensors)")
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")


class DiffusionModelError(InvalidRequest):
    """Diffusion model files that are not what they claim to be."""


def is_file(name: str) -> bool:
    """A part's file name (a fixed shape: none can leave the folder)."""
    return _FILE.fullmatch(name) is not None


def part(name: str) -> str:
    """The part a file is (`diffusion_model.gguf` -> `diffusion_model`)."""
    return name.rsplit(".", 1)[0]


def complete(names: Collection[str]) -> bool:
    """A diffusion model: a checkpoint or a diffusion model, and one file per part."""
    parts = [part(n) for n in names if is_file(n)]
    return len(parts) == len(set(parts)) == len(set(names)) and bool(
        {"model", "diffusion_model"} & set(parts)
    )


def looks_like(names: Collection[str]) -> bool:
    """Whether a folder's or an upload's names are a diffusion model's (parts named as such,
    and no Hugging Face config.json)."""
    return "config.json" not in names and any(
        is_file(n) and part(n) in ("model", "diffusion_model") for n in names
    )


def _tensors(name: str, path: Path) -> Iterator[tuple[str, tuple[int, ...], str]]:
    """(name, shape, type) of every tensor of part file `name` (GGUF or safetensors, as its
    name says: a stored part is a blob named by its digest)."""
    if name.endswith(".gguf"):
        for t in gguf.read(path).tensors:
            yield t.name, tuple(t.dims), _gguf_type(t.type)
        return
    for tensor, t in safetensors.read_header(path).items():
        if tensor == "__metadata__":
            continue
        shape = t.get("shape") if isinstance(t, dict) else None
        if not isinstance(shape, list) or not all(isinstance(d, int) for d in shape):
            raise DiffusionModelError(f"{name}: tensor {tensor[:100]!r} has a bad shape")
        yield tensor, tuple(shape), str(t.get("dtype", "unknown"))


def _gguf_type(kind: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"


def architecture(names: Mapping[str, tuple[int, ...]]) -> str:
    """stable-diffusion.cpp's name for the family of a diffusion model's tensors (name ->
    shape, prefixes as stored), as its loader tells them apart; `unknown` for the rest (it may
    still load)."""
    bare = {n.removeprefix(p): s for n, s in names.items() for p in _PREFIXES if n.startswith(p)}
    bare |= {n: s for n, s in names.items() if not n.startswith(_PREFIXES)}

    def has(prefix: str) -> bool:
        return any(n.startswith(prefix) for n in bare)

    if has("joint_blocks."):
        return "SD3.x"
    if "double_stream_modulation_img.lin.weight" in bare:
        return "Flux.2" if "single_blocks.47.linear1.weight" in bare else "Flux.2 klein"
    if "cap_embedder.0.weight" in bare:
        return "Z-Image"
    if "transformer_blocks.0.img_mod.1.weight" in bare:
        return "Qwen Image"
    if "blocks.0.cross_attn.norm_k.weight" in bare:
        return "Wan 2.x"
    if has("double_blocks.") or has("single_transformer_blocks."):
        return "Flux"
    if has("input_blocks.") or has("down_blocks."):
        if has("label_emb.") or has("add_embedding.") or has("conditioner.embedders.1"):
            return "SDXL"
        context = next(
            (s for n, s in bare.items() if n.endswith("transformer_blocks.0.attn2.to_k.weight")),
            (),
        )
        return "SD 2.x" if 1024 in context else "SD 1.x"
    return "unknown"


def summarize(files: Mapping[str, Path]) -> Summary:
    """The facts of a diffusion model given as name -> file."""
    if not complete(files):
        raise DiffusionModelError(
            "a diffusion model is model.gguf (a whole checkpoint) or diffusion_model.gguf, "
            "with at most one of each of clip_l, clip_g, t5xxl, llm, vae and taesd "
            "(.gguf or .safetensors)"
        )
    params: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    types: Counter[str] = Counter()
    for name, path in sorted(files.items()):
        role = part(name)
        count = 0
        for tensor, shape, kind in _tensors(name, path):
            n = math.prod(shape)
            count += n
            if role in ("model", "diffusion_model"):
                shapes[tensor] = shape
                types[kind] += n
        params[role] = count
    if not shapes:
        raise DiffusionModelError("the diffusion model holds no tensors")
    arch = architecture(shapes)
    total = sum(params.values())
    info: dict[str, Any] = {
        "general.architecture": arch,
        "general.parameter_count": total,
        "diffusion.parts": sorted(params),
        **{f"diffusion.{role}.parameter_count": n for role, n in params.items()},
        **{f"diffusion.{part(n)}.file": n for n in files},
    }
    return Summary(
        architecture=arch,
        parameter_count=total,
        quantization=types.most_common(1)[0][0],
        context_length=0,
        embedding_length=0,
        block_count=0,
        capabilities=["image_generation"],
        chat_template=None,
        license=None,
        model_info=info,
        format="diffusion",
    )
