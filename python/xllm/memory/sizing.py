"""What-if memory plans: a model x weight quantization x KV cache type x backend against the
memory of the chosen devices, the largest context that fits, and the layers that fit.

A GGUF at its own quantization (`FILE`) on llama.cpp is planned by `planner.estimate`, tensor by
tensor as llama.cpp allocates it. Every other combination is computed from the model's shape:

- weights: parameters x bits per weight / 8 (`BITS`: ggml's block sizes for the GGUF types);
- KV cache: 2 x layers x KV heads x head dim x context x sequences x bytes per element;
- activations: llama.cpp's compute buffer (logits of a micro-batch plus `planner.ACTIVATIONS`)
  and its output buffer (one logits row per sequence), taken for every backend;
- the backend's overhead (`BACKENDS`): a factor on top, for CUDA context, allocator slack and
  the like. vLLM preallocates its KV cache exactly, in blocks of 16 tokens, so its factor
  leaves the KV cache alone and it may use `gpu_memory_utilization` of a GPU's total memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from xllm.memory import planner
from xllm.memory.shape import Shape
from xllm.models.gguf import GGUF

FILE = "gguf"
"""The weights as the GGUF file holds them."""
BITS = {"fp32": 32.0, "fp16": 16.0, "bf16": 16.0, "int8": 8.0, "int4": 4.0, "q8_0": 8.5,
        "q6_k": 6.5625, "q5_k": 5.5, "q5_0": 5.5, "q4_k": 4.5, "q4_0": 4.5, "q3_k": 3.4375,
        "q2_k": 2.625}  # fmt: skip
"""Bits per weight of each quantization."""
COMPARED = ("fp16", "int8", "int4")
"""The quantizations every plan compares (the chart's traces)."""
KV_TYPES = ("f16", "q8_0", "q4_0")
MAX_SEARCH = 1_000_000
"""The binary search looks for the largest context in 1 .. this many tokens."""


@dataclass(frozen=True)
class Backend:
    overhead: float
    """Factor on what the backend allocates (documented estimates, not measurements)."""
    kv_overhead: bool
    """Whether the factor covers the KV cache too (False: preallocated exactly)."""
    block: int
    """The KV cache is allocated for whole blocks of this many tokens per sequence."""
    quants: frozenset[str]


_SAFETENSORS = frozenset({"fp32", "fp16", "bf16", "int8", "int4"})
BACKENDS = {
    "llama.cpp": Backend(1.0, True, 1, frozenset({FILE, *BITS})),
    "vllm": Backend(1.10, False, 16, _SAFETENSORS),
    "autogptq": Backend(1.08, True, 1, frozenset({"int8", "int4"})),
    "transformers": Backend(1.15, True, 1, _SAFETENSORS),
}


@dataclass(frozen=True)
class Model:
    label: str
    shape: Shape
    gguf: GGUF | None = None
    """The header, when the model is a GGUF file (so `FILE` can be planned exactly)."""

    def quants(self, backend: str) -> list[str]:
        allowed = BACKENDS[backend].quants
        own = [FILE] if self.gguf is not None and FILE in allowed else []
        return own + [q for q in COMPARED if q in allowed]

    @property
    def search_limit(self) -> int:
        return min(MAX_SEARCH, self.shape.context_length or MAX_SEARCH)


@dataclass(frozen=True)
class Footprint:
    weights: int
    kv: int
    activations: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.activations + self.overhead


@dataclass(frozen=True)
class Setting:
    quant: str
    kv_type: str
    parallel: int
    batch_size: int
    backend: str
    on_cpu: bool = False
    """Planning for RAM: llama.cpp's CPU backend also keeps repacked copies of some matrices."""


def footprint(model: Model, s: Setting, ctx: int) -> Footprint:
    """What `model` takes with setting `s` at `ctx` tokens per sequence."""
    if s.quant == FILE:
        if model.gguf is None:
            raise ValueError("only a GGUF model has its own quantization")
        p = planner.estimate(
            model.gguf, ctx_size=ctx, parallel=s.parallel, batch_size=s.batch_size,
            kv_type=s.kv_type, cpu_repack=s.on_cpu and planner.CPU_REPACK,
        )  # fmt: skip
        return Footprint(p.weights, p.kv, p.compute + p.output, 0)
    backend = BACKENDS[s.backend]
    shape = model.shape
    weights = shape.params * BITS[s.quant] / 8
    cells = math.ceil(ctx / backend.block) * backend.block * s.parallel
    kv = shape.kv_bytes_per_token(planner.KV_TYPE_BYTES[s.kv_type]) * cells
    activations = (
        max(s.batch_size, s.parallel) * shape.vocab * 4
        + planner.ACTIVATIONS
        + s.parallel * shape.vocab * 4
    )
    covered = weights + activations + (kv if backend.kv_overhead else 0)
    return Footprint(int(weights), int(kv), activations, int(covered * (backend.overhead - 1)))


def max_context(model: Model, s: Setting, available: int) -> int:
    """The largest context per sequence (1 .. MAX_SEARCH, at most the model's own) whose
    footprint fits in `available` bytes; 0 when not even one token does."""
    return planner.largest(
        lambda ctx: footprint(model, s, ctx).total <= available, model.search_limit
    )


def layers_that_fit(model: Model, s: Setting, ctx: int, room: int) -> int:
    """How many layers (with their KV cache) fit in `room` bytes beside the activations:
    the offload to ask for when the whole model does not fit."""
    f = footprint(model, s, ctx)
    backend = BACKENDS[s.backend]
    if s.quant == FILE and model.gguf is not None:
        blocks: Sequence[float] = planner.weights(model.gguf, cpu_repack=False).blocks
        kv: Sequence[float] = planner.kv_per_layer(model.gguf, ctx * s.parallel, s.kv_type)
    else:
        shape = model.shape
        embeddings = shape.vocab * shape.hidden_size * BITS[s.quant] / 8
        blocks = [max(f.weights - embeddings, 0) / shape.layers] * shape.layers
        kv = [f.kv / shape.layers] * shape.layers
    factor = backend.overhead
    blocks = [b * factor for b in blocks]
    kv = [k * (factor if backend.kv_overhead else 1) for k in kv]
    return planner.layers_that_fit(blocks, kv, room - f.activations * factor)[0]
