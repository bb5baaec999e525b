"""Tiny random-weight vision projectors (`mmproj` GGUF files) that libmtmd really loads.

No small real projector exists on PyPI, so the tests write their own with the `gguf` package:
a CLIP-style ViT with an `mlp` head (LLaVA's layout) whose output size matches a text model's
embedding size. Random weights cannot describe an image, but they carry it: different pixels
give different embeddings, so tests can check the plumbing (token counts, determinism, red vs
blue, the prefix cache), never understanding. `python -m tests.projectors OUT.gguf N_EMBD
[IMAGE_SIZE]` writes one (the benchmark uses a bigger one, whose encoding takes a while).
"""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np


def write_projector(
    path: Path,
    n_embd_text: int,
    *,
    n_embd: int = 32,
    n_ff: int = 48,
    n_head: int = 2,
    n_layer: int = 2,
    image_size: int = 32,
    patch: int = 8,
    seed: int = 0,
    kind: str = "mlp",
) -> Path:
    """A projector giving image tokens of `n_embd_text` floats: `mlp` (LLaVA's head), or
    `gemma3` (Gemma 3's: 2x2 average pooling, and attention over the image both ways).

    `n_ff` must differ from `n_embd` (clip.cpp tells ffn_up from ffn_down by their shapes).
    """
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "clip")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_string("clip.projector_type", kind)
    for key, value in {
        "embedding_length": n_embd,
        "feed_forward_length": n_ff,
        "block_count": n_layer,
        "attention.head_count": n_head,
        "projection_dim": n_embd_text,
        "image_size": image_size,
        "patch_size": patch,
    }.items():
        w.add_uint32(f"clip.vision.{key}", value)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-6)
    w.add_array("clip.vision.image_mean", [0.5] * 3)
    w.add_array("clip.vision.image_std", [0.5] * 3)
    w.add_bool("clip.use_gelu", True)

    def matrix(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.05).astype(np.float16)

    def vector(n: int, value: float | None = None) -> np.ndarray:
        if value is not None:
            return np.full(n, value, np.float32)
        return (rng.standard_normal(n) * 0.02).astype(np.float32)

    n_patches = (image_size // patch) ** 2
    w.add_tensor("v.patch_embd.weight", matrix(n_embd, 3, patch, patch))
    w.add_tensor("v.patch_embd.bias", vector(n_embd))
    w.add_tensor("v.position_embd.weight", vector(n_patches * n_embd).reshape(-1, n_embd))
    for i in range(n_layer):
        p = f"v.blk.{i}."
        for t in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(f"{p}{t}.weight", matrix(n_embd, n_embd))
            w.add_tensor(f"{p}{t}.bias", vector(n_embd))
        for t in ("ln1", "ln2"):
            w.add_tensor(f"{p}{t}.weight", vector(n_embd, 1.0))
            w.add_tensor(f"{p}{t}.bias", vector(n_embd, 0.0))
        w.add_tensor(f"{p}ffn_up.weight", matrix(n_ff, n_embd))
        w.add_tensor(f"{p}ffn_up.bias", vector(n_ff))
        w.add_tensor(f"{p}ffn_down.weight", matrix(n_embd, n_ff))
        w.add_tensor(f"{p}ffn_down.bias", vector(n_embd))
    if kind == "gemma3":
        w.add_uint32("clip.vision.projector.scale_factor", 2)
        w.add_tensor("v.post_ln.weight", vector(n_embd, 1.0))
        w.add_tensor("v.post_ln.bias", vector(n_embd, 0.0))
        w.add_tensor("mm.soft_emb_norm.weight", vector(n_embd, 1.0))
        w.add_tensor("mm.input_projection.weight", matrix(n_embd, n_embd_text))
    else:  # the head: n_embd -> n_embd -> the text model's embedding size
        w.add_tensor("mm.0.weight", matrix(n_embd, n_embd))
        w.add_tensor("mm.0.bias", vector(n_embd))
        w.add_tensor("mm.2.weight", matrix(n_embd_text, n_embd))
        w.add_tensor("mm.2.bias", vector(n_embd_text))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def image_tokens(image_size: int = 32, patch: int = 8, kind: str = "mlp") -> int:
    """How many tokens an image takes with `write_projector`'s geometry (a `gemma3` one
    pools 2x2 patches into a token)."""
    return (image_size // patch // (2 if kind == "gemma3" else 1)) ** 2


if __name__ == "__main__":
    size = int(sys.argv[3]) if len(sys.argv) > 3 else 32
    write_projector(Path(sys.argv[1]), int(sys.argv[2]), image_size=size)
