"""The memory planner against what llama.cpp really allocates, and its search and offload tables."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from xllm.memory import planner
from xllm.memory.probe import GPU
from xllm.models import gguf
from xllm.models.gguf import GGUF, Tensor

MiB = 1024 * 1024

LLAMA_CPP_REPORT = """
import sys
import llama_cpp as lc
from llama_cpp import _logger
_logger.set_verbose(True)
path, ctx, parallel, kv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
mparams = lc.llama_model_default_params()
mparams.n_gpu_layers = 0
model = lc.llama_model_load_from_file(path.encode(), mparams)
# the context xllm's engine makes (engine/llamacpp.py), with the KV type under test
cparams = lc.llama_context_default_params()
cparams.n_ctx = ctx * parallel
cparams.n_seq_max = parallel
cparams.n_batch = cparams.n_ubatch = 512
cparams.n_threads = cparams.n_threads_batch = 2
cparams.kv_unified = False
cparams.type_k = cparams.type_v = kv
if kv != 1:
    cparams.flash_attn_type = 1  # a quantized V cache needs flash attention
lc.llama_free(lc.llama_init_from_model(model, cparams))
"""
GGML_KV_TYPES = {"f16": 1, "q8_0": 8, "q4_0": 2}


def _reported(path: Path, ctx: int, parallel: int, kv_type: str) -> dict[str, float]:
    """Buffer sizes llama.cpp prints when it loads the model (MiB)."""
    argv = [str(path), str(ctx), str(parallel), str(GGML_KV_TYPES[kv_type])]
    r = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_REPORT, *argv], capture_output=True, text=True, check=True
    )
    log = (r.stderr + r.stdout).split("~llama_context")[0]
    sizes: dict[str, float] = {}
    for key, pattern in {
        "weights": r"model buffer size =\s+([\d.]+) MiB",
        "kv": r"KV buffer size =\s+([\d.]+) MiB",
        "compute": r"compute buffer size =\s+([\d.]+) MiB",
        "output": r"output buffer size =\s+([\d.]+) MiB",
    }.items():
        sizes[key] = sum(float(x) for x in re.findall(pattern, log))
    return sizes


@pytest.mark.parametrize(
    ("model", "ctx", "parallel", "kv_type"),
    [
        ("smollm2_path", 1024, 4, "f16"),
        ("smollm2_path", 512, 16, "f16"),
        ("smollm2_path", 2048, 2, "q8_0"),
        ("tiny_path", 1024, 4, "f16"),
        ("qwen_tools_path", 1024, 4, "f16"),  # q4_K: llama.cpp's CPU repack buffer counts too
        ("qwen_tools_path", 4096, 2, "q4_0"),
    ],
)
def test_plan_matches_llama_cpp(
    request: pytest.FixtureRequest, model: str, ctx: int, parallel: int, kv_type: str
) -> None:
    path: Path = request.getfixturevalue(model)
    plan = planner.estimate(
        gguf.read(path), ctx_size=ctx, parallel=parallel, batch_size=512, kv_type=kv_type
    )
    real = _reported(path, ctx, parallel, kv_type)
    print(f"{path.name} ctx={ctx} x{parallel} {kv_type}: ours {plan}, llama.cpp {real}")
    for part in ("weights", "kv", "compute", "output"):
        ours = getattr(plan, part) / MiB
        assert ours == pytest.approx(real[part], rel=0.10), (part, ours, real)
    assert plan.gpu_layers == 0 and plan.vram == 0


def _model(blocks: list[int], *, n_head_kv: int | list[int] = 2, tied: bool = False) -> GGUF:
    """A header with blocks of the given byte sizes (f32 tensors), 4 heads of 16, vocab 1000."""
    tensors = [Tensor("token_embd.weight", (64, 1000), 0, 0, 256_000)]
    for i, size in enumerate(blocks):
        tensors.append(Tensor(f"blk.{i}.ffn_up.weight", (size // 4,), 0, 0, size))
    if not tied:
        tensors.append(Tensor("output.weight", (64, 1000), 0, 0, 256_000))
    tensors.append(Tensor("output_norm.weight", (64,), 0, 0, 256))
    meta = {
        "general.architecture": "llama",
        "llama.block_count": len(blocks),
        "llama.context_length": 4096,
        "llama.embedding_length": 64,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": n_head_kv,
    }
    return GGUF(Path("m.gguf"), 3, meta, tensors=tensors)


def test_kv_cache_arithmetic_table() -> None:
    # layers x KV heads x (K + V head size) x cells x bytes per element
    g = _model([MiB] * 4)
    assert planner.kv_bytes(g, 1000) == 4 * 2 * (16 + 16) * 1000 * 2
    assert planner.kv_bytes(g, 1000, "q8_0") == 4 * 2 * 32 * 1000 * 34 // 32
    assert planner.kv_bytes(g, 1000, "q4_0") == 4 * 2 * 32 * 1000 * 18 // 32
    # no head_count_kv: as many KV heads as heads (no GQA)
    mha = _model([MiB] * 4)
    del mha.metadata["llama.attention.head_count_kv"]
    assert planner.kv_bytes(mha, 1000) == 2 * planner.kv_bytes(g, 1000)
    # per-layer KV heads (0 for a layer without attention)
    varied = _model([MiB] * 4, n_head_kv=[2, 0, 4, 2])
    assert planner.kv_per_layer(varied, 10) == [
        2 * 32 * 10 * 2,
        0,
        4 * 32 * 10 * 2,
        2 * 32 * 10 * 2,
    ]
    # explicit key/value lengths win over embedding / heads
    g.metadata |= {"llama.attention.key_length": 24, "llama.attention.value_length": 8}
    assert planner.kv_bytes(g, 1000) == 4 * 2 * (24 + 8) * 1000 * 2


def _gpu(free_mib: float, index: int = 0) -> GPU:
    free = int(free_mib * MiB)
    return GPU(index=index, name="test", total_bytes=2 * free, free_bytes=free, driver="x")


# 4 blocks of 10 MiB; ctx 1024 x 1 sequence: KV 0.25 MiB per layer; compute 512 x 1000 x 4 + 4 MiB
COMPUTE = 512 * 1000 * 4 + planner.ACTIVATIONS
LAYER = 10 * MiB + 2 * 32 * 1024 * 2


def _room(layers: int, output: int = 0) -> float:
    """Free GPU memory (MiB) that holds exactly `layers` blocks plus `output` bytes."""
    return (COMPUTE + layers * LAYER + output) / MiB / (1 - planner.SAFETY) + 0.01


@pytest.mark.parametrize(
    ("gpus", "wanted", "tied", "layers", "vram"),
    [
        ([], -1, False, 0, 0),  # no GPU: plan for the CPU
        ([_gpu(10_000)], -1, False, 5, 4 * LAYER + 256_256 + COMPUTE),  # all blocks + output
        ([_gpu(10_000)], -1, True, 5, 4 * LAYER + 256_256 + COMPUTE),  # tied: embeddings copied in
        ([_gpu(10_000)], 0, False, 0, 0),  # the user asked for none
        ([_gpu(10_000)], 2, False, 2, 2 * LAYER + COMPUTE),
        ([_gpu(_room(3))], -1, False, 3, 3 * LAYER + COMPUTE),  # partly
        ([_gpu(_room(3) / 2), _gpu(_room(3) / 2, 1)], -1, False, 3, 3 * LAYER + COMPUTE),  # pooled
        ([_gpu(_room(4))], -1, False, 4, 4 * LAYER + COMPUTE),  # all blocks, output stays on CPU
        ([_gpu(_room(4, 256_256))], -1, False, 5, 4 * LAYER + 256_256 + COMPUTE),
        ([_gpu(COMPUTE / MiB)], -1, False, 0, 0),  # not even the compute buffer fits
    ],
)
def test_gpu_offload_table(
    gpus: list[GPU], wanted: int, tied: bool, layers: int, vram: int
) -> None:
    g = _model([10 * MiB] * 4, tied=tied)
    plan = planner.estimate(
        g, ctx_size=1024, parallel=1, batch_size=512, gpus=gpus, gpu_layers=wanted
    )
    assert (plan.gpu_layers, plan.vram) == (layers, vram)
    assert plan.ram == plan.total - plan.vram
    assert plan.vram <= sum(x.free_bytes for x in gpus)


def test_cpu_repack_counts_only_blocks_left_on_the_cpu() -> None:
    g = _model([10 * MiB] * 4)
    for i in range(4):  # a q4_K matrix per block: the CPU backend keeps a repacked copy
        g.tensors.append(Tensor(f"blk.{i}.attn_q.weight", (256, 64), 12, 0, 9216))
    g.tensors.append(Tensor("blk.0.ffn_gate.weight", (256, 60), 12, 0, 8640))  # rows % 8 != 0
    plain = planner.estimate(g, ctx_size=64, parallel=1, batch_size=512, cpu_repack=False)
    cpu = planner.estimate(g, ctx_size=64, parallel=1, batch_size=512, cpu_repack=True)
    assert cpu.weights - plain.weights == 4 * 9216
    half = planner.estimate(
        g, ctx_size=64, parallel=1, batch_size=512, gpus=[_gpu(_room(2) + 1)], cpu_repack=True
    )
    assert half.gpu_layers == 2
    assert half.weights - plain.weights == 2 * 9216  # blocks 2 and 3 went to the GPU


def test_split_in_proportion_to_free_memory() -> None:
    assert planner.split([_gpu(300), _gpu(100, 1)]) == [0.75, 0.25]
    assert planner.split([]) == []
    g = _model([10 * MiB] * 4)
    two = planner.estimate(
        g, ctx_size=64, parallel=1, batch_size=512, gpus=[_gpu(3000), _gpu(1000, 1)]
    )
    assert two.gpu_layers > 0 and two.split == (0.75, 0.25)  # the loader uses it as planned
    one = planner.estimate(g, ctx_size=64, parallel=1, batch_size=512, gpus=[_gpu(3000)])
    assert one.split == ()


@pytest.mark.parametrize("kv_type", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("wanted_ctx", [1, 100, 2048, 3000, 4096])
def test_max_context_search(kv_type: str, wanted_ctx: int) -> None:
    g = _model([10 * MiB] * 4)
    base = planner.estimate(g, ctx_size=0, parallel=4, batch_size=512, kv_type=kv_type).total
    per_token = planner.kv_bytes(g, 4, kv_type)  # one more token per sequence, 4 sequences
    available = base + wanted_ctx * per_token
    found = planner.max_context(g, available=available, parallel=4, batch_size=512, kv_type=kv_type)
    assert found == wanted_ctx
    assert (
        planner.max_context(g, available=available - 1, parallel=4, batch_size=512, kv_type=kv_type)
        == wanted_ctx - 1
    )


def test_max_context_bounds(smollm2_path: Path) -> None:
    g = gguf.read(smollm2_path)
    assert planner.max_context(g, available=10**15, parallel=4, batch_size=512) == 8192
    assert planner.max_context(g, available=0, parallel=4, batch_size=512) == 0
    f16 = planner.max_context(g, available=300 * MiB, parallel=4, batch_size=512)
    q4 = planner.max_context(g, available=300 * MiB, parallel=4, batch_size=512, kv_type="q4_0")
    assert 0 < f16 < q4


def test_real_model_offload(smollm2_path: Path) -> None:
    g = gguf.read(smollm2_path)
    full = planner.estimate(g, ctx_size=1024, parallel=4, batch_size=512, gpus=[_gpu(10_000)])
    assert full.gpu_layers == 31 and full.ram == full.total - full.vram
    part = planner.estimate(g, ctx_size=1024, parallel=4, batch_size=512, gpus=[_gpu(160)])
    assert 0 < part.gpu_layers < 30 and part.vram <= 160 * MiB
