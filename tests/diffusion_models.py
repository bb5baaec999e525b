"""A tiny random-weight diffusion model that stable-diffusion.cpp really loads: FLUX.2-klein's
shape (which stable-diffusion.cpp reads from the tensors, unlike SD 1.x/SDXL whose sizes it
hard-codes) at toy widths, a one-layer Qwen3 text encoder and the tiny autoencoder (TAE).

Three GGUF files, about 25 MB, written in a second or two. Its pictures are noise: the tests
that use it check the plumbing (sizes, seeds, formats, files, cancellation), not the images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

H, C, M = 128, 64, 384
"""The DiT's width, the text encoder's width and the DiT's MLP width (3 * H)."""
VOCAB = 151_936
"""Qwen's vocabulary, whose tokenizer stable-diffusion.cpp has built in."""


def _write(path: Path, tensors: dict[str, np.ndarray]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "tiny")
    for name, array in tensors.items():
        w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_tiny_flux2(folder: Path, seed: int = 0) -> Path:
    """`folder` with diffusion_model.gguf, llm.gguf and taesd.gguf (the part names xllm's
    diffusion models use); returns it."""
    rng = np.random.default_rng(seed)

    def w(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) * 0.02).astype(np.float16)

    def v(n: int, x: float = 1.0) -> np.ndarray:
        return np.full(n, x, np.float32)

    def k(o: int, i: int, size: int) -> np.ndarray:
        return (rng.standard_normal((o, i, size, size)) * 0.05).astype(np.float16)

    dit = {
        "img_in.weight": w(H, 128), "time_in.in_layer.weight": w(H, 256),
        "time_in.out_layer.weight": w(H, H), "txt_in.weight": w(H, C),
        "final_layer.linear.weight": w(128, H), "final_layer.adaLN_modulation.1.weight": w(2 * H, H),
        "double_stream_modulation_img.lin.weight": w(6 * H, H),
        "double_stream_modulation_txt.lin.weight": w(6 * H, H),
        "single_stream_modulation.lin.weight": w(3 * H, H),
        "single_blocks.0.linear1.weight": w(3 * H + 2 * M, H),
        "single_blocks.0.linear2.weight": w(H, H + M),
        "single_blocks.0.norm.query_norm.scale": v(128),
        "single_blocks.0.norm.key_norm.scale": v(128),
    }  # fmt: skip
    for stream in ("img", "txt"):
        p = f"double_blocks.0.{stream}_"
        dit |= {
            p + "attn.qkv.weight": w(3 * H, H), p + "attn.norm.query_norm.scale": v(128),
            p + "attn.norm.key_norm.scale": v(128), p + "attn.proj.weight": w(H, H),
            p + "mlp.0.weight": w(2 * M, H), p + "mlp.2.weight": w(H, M),
        }  # fmt: skip
    q = "model.layers.0."
    llm = {
        "model.embed_tokens.weight": w(VOCAB, C), "model.norm.weight": v(C),
        q + "self_attn.q_proj.weight": w(4096, C), q + "self_attn.k_proj.weight": w(1024, C),
        q + "self_attn.v_proj.weight": w(1024, C), q + "self_attn.o_proj.weight": w(C, 4096),
        q + "self_attn.q_norm.weight": v(128), q + "self_attn.k_norm.weight": v(128),
        q + "mlp.gate_proj.weight": w(128, C), q + "mlp.up_proj.weight": w(128, C),
        q + "mlp.down_proj.weight": w(C, 128), q + "input_layernorm.weight": v(C),
        q + "post_attention_layernorm.weight": v(C),
    }  # fmt: skip
    d = "decoder.layers."
    tae = {d + "0.weight": k(64, 32, 3), d + "0.bias": v(64, 0.0), d + "18.weight": k(3, 64, 3),
           d + "18.bias": v(3, 0.0)}  # fmt: skip
    for i in (2, 3, 4, 7, 8, 9, 12, 13, 14, 17):
        for conv in ("conv.0", "conv.2", "conv.4"):
            tae |= {f"{d}{i}.{conv}.weight": k(64, 64, 3), f"{d}{i}.{conv}.bias": v(64, 0.0)}
        if i in (2, 3, 4):  # TAEF2's mid-block group norm
            tae |= {f"{d}{i}.pool.0.weight": k(256, 64, 1), f"{d}{i}.pool.1.weight": v(256),
                    f"{d}{i}.pool.1.bias": v(256, 0.0), f"{d}{i}.pool.3.weight": k(64, 256, 1)}  # fmt: skip
    for i in (6, 11, 16):
        tae[f"{d}{i}.weight"] = k(64, 64, 3)
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "diffusion_model.gguf", dit)
    _write(folder / "llm.gguf", llm)
    _write(folder / "taesd.gguf", tae)
    return folder
