"""The memory plan made before every load: weights + KV cache + compute buffers vs free memory.

Pure arithmetic over a GGUF header (`models/gguf.py`), so it is table-testable and the same
numbers serve the loader and `/v0/health`. The formulas follow what llama.cpp allocates:
KV = layers x KV heads x (K + V head size) x cells x bytes per element (cells = context per
sequence x sequences); compute = logits for a whole micro-batch (n_ubatch x n_vocab floats)
plus a few MiB of activations; output = one logits row per sequence.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from xllm.memory.probe import GPU
from xllm.models.gguf import GGUF

MiB = 1024 * 1024
# bytes per element of the KV cache types llama.cpp supports
KV_TYPE_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32, "q5_1": 24 / 32,
                 "q5_0": 22 / 32, "q4_1": 20 / 32, "q4_0": 18 / 32}  # fmt: skip
ACTIVATIONS = 4 * MiB
SAFETY = 0.10
"""Keep this fraction of free memory unused (allocator slack, the OS, other processes)."""
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Plan:
    weights: int
    kv: int
    compute: int
    output: int
    layers: int
    gpu_layers: int
    """Layers to offload; 0 on a machine without a usable GPU."""
    vram: int
    """Of `total`, what goes to GPU memory."""

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.output

    @property
    def ram(self) -> int:
        return self.total - self.vram

    def describe(self) -> str:
        return (
            f"weights {self.weights / MiB:.0f} MiB + KV cache {self.kv / MiB:.0f} MiB + compute "
            f"{(self.compute + self.output) / MiB:.0f} MiB = {self.total / MiB:.0f} MiB"
        )


def kv_bytes(g: GGUF, cells: int, kv_type: str = "f16") -> int:
    n_layer = g.arch_int("block_count")
    n_head = max(g.arch_int("attention.head_count"), 1)
    n_head_kv = g.arch_int("attention.head_count_kv") or n_head
    head = g.arch_int("embedding_length") // n_head
    k = g.arch_int("attention.key_length") or head
    v = g.arch_int("attention.value_length") or head
    return int(n_layer * n_head_kv * (k + v) * cells * KV_TYPE_BYTES[kv_type])


def n_vocab(g: GGUF) -> int:
    embd = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    return int(embd.dims[1]) if embd is not None and len(embd.dims) > 1 else 0


def estimate(
    g: GGUF,
    *,
    ctx_size: int,
    parallel: int,
    batch_size: int,
    gpus: Sequence[GPU] = (),
    gpu_layers: int = -1,
    kv_type: str = "f16",
) -> Plan:
    """What loading `g` with these settings will take, and how many layers go to the GPUs."""
    ctx = min(ctx_size, g.arch_int("context_length") or ctx_size)
    layers = g.arch_int("block_count")
    per_layer = [0] * layers
    other = 0
    for t in g.tensors:
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < layers:
            per_layer[int(m.group(1))] += t.nbytes
        else:
            other += t.nbytes
    weights = sum(per_layer) + other
    kv = kv_bytes(g, ctx * parallel, kv_type)
    vocab = n_vocab(g)
    compute = max(batch_size, parallel) * vocab * 4 + ACTIVATIONS
    output = parallel * vocab * 4
    offload, vram = _offload(per_layer, other, kv, compute, gpus, gpu_layers)
    return Plan(weights, kv, compute, output, layers, offload, vram)


def _offload(
    per_layer: list[int], other: int, kv: int, compute: int, gpus: Sequence[GPU], wanted: int
) -> tuple[int, int]:
    """As many layers as fit in the GPUs' free memory (the rest stays on the CPU)."""
    free = int(sum(g.free_bytes for g in gpus) * (1 - SAFETY)) - compute
    if not gpus or wanted == 0 or free <= 0:
        return 0, 0
    kv_layer = kv // max(len(per_layer), 1)
    limit = len(per_layer) if wanted < 0 else min(wanted, len(per_layer))
    used = n = 0
    for size in per_layer[:limit]:
        if used + size + kv_layer > free:
            break
        used += size + kv_layer
        n += 1
    if n == len(per_layer) and used + other <= free:  # output layer too: "all layers"
        return n + 1, used + other + compute
    return n, used + (compute if n else 0)


def split(gpus: Sequence[GPU]) -> list[float]:
    """Share of the offloaded layers per GPU: proportional to free memory."""
    total = sum(g.free_bytes for g in gpus)
    return [g.free_bytes / total for g in gpus] if total else []


def max_context(
    g: GGUF, *, available: int, parallel: int, batch_size: int, kv_type: str = "f16"
) -> int:
    """The largest context per sequence whose plan fits in `available` bytes (binary search)."""
    lo, hi = 0, g.arch_int("context_length") or 131072
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = estimate(g, ctx_size=mid, parallel=parallel, batch_size=batch_size, kv_type=kv_type)
        if p.total <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo
