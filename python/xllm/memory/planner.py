"""The memory plan made before every load: weights + KV cache + compute buffers vs free memory.

Pure arithmetic over a GGUF header (`models/gguf.py`), so it is table-testable and the same
numbers serve the loader, `/v0/health` and `xllm plan`. The formulas follow what llama.cpp
allocates (checked against its load log in tests/test_planner.py):

- weights: the tensors of each block `blk.N.*`, so a partial offload is counted per layer. The
  input embeddings always stay on the CPU; the output layer goes to the GPU only with every block.
  On the CPU, llama.cpp keeps a second, repacked copy of q4_0/q4_K/iq4_nl matrices (its
  CPU_REPACK buffer); an output layer tied to the embeddings is copied to the GPU.
- KV cache, per layer: KV heads x (K + V head size) x cells x bytes per element of the KV type,
  cells = context per sequence x sequences (GQA: KV heads, not query heads).
- compute: logits for a whole micro-batch (n_ubatch x n_vocab floats) plus a few MiB of
  activations; output: one logits row per sequence, in host memory.
"""

from __future__ import annotations

import dataclasses
import platform
import re
from collections.abc import Callable, Sequence
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
REPACKED_TYPES = frozenset({2, 12, 20})
"""ggml types (q4_0, q4_K, iq4_nl) whose matrices ggml's CPU backend also keeps repacked."""
CPU_REPACK = platform.machine().lower() in {"x86_64", "amd64", "aarch64", "arm64"}
INPUT = "token_embd."
_LAYER = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Plan:
    weights: int
    kv: int
    compute: int
    output: int
    layers: int
    gpu_layers: int
    """Layers to offload (blocks, plus one for the output layer); 0 without a usable GPU."""
    vram: int
    """Of `total`, what goes to GPU memory."""
    split: tuple[float, ...] = ()
    """Share of the offloaded layers per GPU when there are several (by free memory at
    planning time, so that loading does not read the GPUs again)."""

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


@dataclass(frozen=True)
class Weights:
    """A model's tensor bytes by where llama.cpp places them."""

    blocks: list[int]
    repack: list[int]
    """Per block: the extra repacked copy made while the block stays on the CPU."""
    input: int
    output: int
    output_repack: int
    tied_output: int
    """Bytes of the embeddings that double as the output layer (0 with an own output tensor)."""


def weights(g: GGUF, cpu_repack: bool = CPU_REPACK) -> Weights:
    n = g.arch_int("block_count")
    blocks, repack = [0] * n, [0] * n
    inp = out = out_repack = 0
    names = set()
    for t in g.tensors:
        names.add(t.name)
        extra = (
            t.nbytes
            if cpu_repack
            and t.type in REPACKED_TYPES
            and len(t.dims) >= 2
            and t.dims[1] % 8 == 0
            and not t.name.startswith(INPUT)  # read by row lookups, never multiplied
            else 0
        )
        m = _LAYER.match(t.name)
        if m and int(m.group(1)) < n:
            blocks[int(m.group(1))] += t.nbytes
            repack[int(m.group(1))] += extra
        elif t.name.startswith(INPUT):
            inp += t.nbytes
        else:
            out += t.nbytes
            out_repack += extra
    tied = inp if "output.weight" not in names else 0
    return Weights(blocks, repack, inp, out, out_repack, tied)


def _per_layer(g: GGUF, key: str, n_layer: int, default: int) -> list[int]:
    """An architecture key that may hold one value or one per layer."""
    value = g.metadata.get(f"{g.architecture}.{key}")
    if isinstance(value, list) and len(value) == n_layer:
        return [int(v) for v in value]
    return [g.arch_int(key, default)] * n_layer


def kv_per_layer(g: GGUF, cells: int, kv_type: str = "f16") -> list[int]:
    """KV cache bytes of each layer for `cells` tokens (all sequences together)."""
    n_layer = g.arch_int("block_count")
    heads = _per_layer(g, "attention.head_count", n_layer, 1)
    has_kv_heads = f"{g.architecture}.attention.head_count_kv" in g.metadata
    kv_heads = _per_layer(g, "attention.head_count_kv", n_layer, 0) if has_kv_heads else heads
    embd = g.arch_int("embedding_length")
    out = []
    for h, h_kv in zip(heads, kv_heads, strict=True):
        k = g.arch_int("attention.key_length") or embd // max(h, 1)
        v = g.arch_int("attention.value_length") or embd // max(h, 1)
        out.append(int(h_kv * (k + v) * cells * KV_TYPE_BYTES[kv_type]))
    return out


def kv_bytes(g: GGUF, cells: int, kv_type: str = "f16") -> int:
    return sum(kv_per_layer(g, cells, kv_type))


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
    cpu_repack: bool = CPU_REPACK,
) -> Plan:
    """What loading `g` with these settings will take, and how many layers go to the GPUs."""
    ctx = min(ctx_size, g.arch_int("context_length") or ctx_size)
    w = weights(g, cpu_repack)
    kv = kv_per_layer(g, ctx * parallel, kv_type)
    vocab = n_vocab(g)
    compute = max(batch_size, parallel) * vocab * 4 + ACTIVATIONS
    output = parallel * vocab * 4
    offload, vram = _offload(w, kv, compute, gpus, gpu_layers)
    n_layer = len(w.blocks)
    on_gpu = range(n_layer - min(offload, n_layer), n_layer)  # llama.cpp offloads the last ones
    cpu_repack_bytes = sum(r for i, r in enumerate(w.repack) if i not in on_gpu)
    output_on_gpu = offload > n_layer
    total_weights = (
        sum(w.blocks)
        + w.input
        + w.output
        + cpu_repack_bytes
        + (w.tied_output if output_on_gpu else w.output_repack)
    )
    shares = tuple(split(gpus)) if len(gpus) > 1 and offload else ()
    return Plan(total_weights, sum(kv), compute, output, n_layer, offload, vram, shares)


def with_projector(plan: Plan, weights: int, compute: int) -> Plan:
    """`plan` with a vision projector beside the model: its tensors and libmtmd's compute
    buffer for an image (`models/projector.py`), on the GPU when the model has layers there
    (libmtmd then runs the projector on it)."""
    extra = weights + compute
    return dataclasses.replace(
        plan,
        weights=plan.weights + weights,
        compute=plan.compute + compute,
        vram=plan.vram + (extra if plan.vram else 0),
    )


def _offload(
    w: Weights, kv: list[int], compute: int, gpus: Sequence[GPU], wanted: int
) -> tuple[int, int]:
    """(layers, VRAM bytes): as many of the last blocks as fit in the GPUs' free memory, then
    the output layer. The layers are split in proportion to free memory (`split`), so the
    GPUs' free memory pools; the compute buffer goes to the GPU too."""
    free = int(sum(g.free_bytes for g in gpus) * (1 - SAFETY)) - compute
    if not gpus or wanted == 0 or free <= 0:
        return 0, 0
    n_layer = len(w.blocks)
    limit = n_layer + 1 if wanted < 0 else min(wanted, n_layer + 1)
    n, used = layers_that_fit(w.blocks, kv, free, limit)
    output = w.output + w.tied_output
    if n == n_layer and limit > n_layer and used + output <= free:
        return n + 1, used + output + compute
    return n, used + (compute if n else 0)


def layers_that_fit(
    blocks: Sequence[float], kv: Sequence[float], room: float, limit: int | None = None
) -> tuple[int, int]:
    """(layers, bytes): how many of the last blocks, with their KV cache, fit in `room` bytes
    (llama.cpp offloads the last ones first), at most `limit`."""
    used = 0.0
    n = 0
    for i in reversed(range(len(blocks))):
        if n == limit or used + blocks[i] + kv[i] > room:
            break
        used += blocks[i] + kv[i]
        n += 1
    return n, int(used)


def split(gpus: Sequence[GPU]) -> list[float]:
    """Share of the offloaded layers per GPU: proportional to free memory."""
    total = sum(g.free_bytes for g in gpus)
    return [g.free_bytes / total for g in gpus] if total else []


def max_context(
    g: GGUF, *, available: int, parallel: int, batch_size: int, kv_type: str = "f16"
) -> int:
    """The largest context per sequence whose plan fits in `available` bytes (binary search)."""
    hi = g.arch_int("context_length") or 131072
    return largest(
        lambda ctx: (
            estimate(
                g, ctx_size=ctx, parallel=parallel, batch_size=batch_size, kv_type=kv_type
            ).total
            <= available
        ),
        hi,
    )


def largest(fits: Callable[[int], bool], hi: int) -> int:
    """The largest n in 0..hi with fits(n), for a `fits` that is true up to a point (binary
    search: about 20 tries for a million)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo
