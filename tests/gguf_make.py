"""Real GGUF files the tests make from the shipped models: shards of a split model (as
llama.cpp's `gguf-split` writes them) and LoRA adapters (as `convert_lora_to_gguf.py` does).

Both are written by the `gguf` package, llama.cpp's own writer, and load in llama.cpp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


def split(source: Path, out_dir: Path, shards: int) -> list[Path]:
    """Rewrite `source` as `shards` files `<stem>-0000i-of-0000N.gguf` (metadata in the first,
    tensors spread evenly, `split.*` keys in each); returns them in order."""
    reader = GGUFReader(source)
    arch = str(reader.fields["general.architecture"].contents())
    per_shard = -(-len(reader.tensors) // shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(out_dir / f"{source.stem}.gguf", arch, split_max_tensors=per_shard)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor(t.name, t.data, raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    paths = sorted(out_dir.glob(f"{source.stem}-*-of-*.gguf"))
    assert len(paths) == shards, paths
    return paths


def lora(
    base: Path,
    out: Path,
    rank: int = 4,
    seed: int = 0,
    strength: float = 1.0,
    dtype: type[np.floating[Any]] = np.float32,
) -> Path:
    """A LoRA adapter for `base`'s attention projections, with random A and B scaled by
    `strength` (0: an adapter that changes nothing), stored as `dtype`."""
    reader = GGUFReader(base)
    arch = str(reader.fields["general.architecture"].contents())
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(out, arch)
    writer.add_string("general.type", "adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    for t in reader.tensors:
        if not t.name.endswith(("attn_q.weight", "attn_v.weight")):
            continue
        n_in, n_out = int(t.shape[0]), int(t.shape[1])  # ggml order: ne[0] is the input
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(dtype)
        b = (rng.standard_normal((n_out, rank)) * strength).astype(dtype)
        writer.add_tensor(f"{t.name}.lora_a", a)
        writer.add_tensor(f"{t.name}.lora_b", b)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
