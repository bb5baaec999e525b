"""The registry's decisions that need a GPU to happen for real: after an out-of-memory failure
at load with layers offloaded, one retry with half as many (this machine has no GPU, so the
runner's failure is played by a stand-in for `LlamaModel.load`), and the memory reading."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from xllm.engine import registry as registry_module
from xllm.engine.llama import LlamaModel
from xllm.engine.options import EngineOptions
from xllm.engine.registry import ModelRegistry, instance_key, is_out_of_memory, memory_pressure
from xllm.errors import ModelLoadError
from xllm.memory.probe import GPU

FAILED = (
    "failed to load model 'm:latest' from /m.gguf: llama.cpp could not load /m.gguf (the "
    "server's log has llama.cpp's messages)"
)
CUDA_OOM = (
    "ggml_backend_cuda_buffer_type_alloc_buffer: allocating 4096.00 MiB on device 0: "
    "cudaMalloc failed: out of memory"
)


def _fake_load(fits: int, calls: list[int]) -> Any:
    async def load(name: str, path: Path, options: EngineOptions, observer: Any = None) -> Any:
        calls.append(options.gpu_layers)
        if options.gpu_layers > fits:
            raise ModelLoadError(FAILED, detail=CUDA_OOM)  # llama.cpp's log: not for clients
        return object()

    return load


@pytest.mark.parametrize(("layers", "fits", "tries"), [(32, 16, [32, 16]), (32, 40, [32])])
async def test_out_of_memory_retries_once_with_half_the_layers(
    monkeypatch: pytest.MonkeyPatch, layers: int, fits: int, tries: list[int]
) -> None:
    calls: list[int] = []
    monkeypatch.setattr(LlamaModel, "load", _fake_load(fits, calls))
    reg = ModelRegistry(EngineOptions())
    await reg._start("m:latest", Path("/m.gguf"), EngineOptions(gpu_layers=layers))
    assert calls == tries


async def test_out_of_memory_twice_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(LlamaModel, "load", _fake_load(3, calls))
    reg = ModelRegistry(EngineOptions())
    with pytest.raises(ModelLoadError) as e:
        await reg._start("m:latest", Path("/m.gguf"), EngineOptions(gpu_layers=32))
    assert e.value.message == FAILED and e.value.detail == CUDA_OOM
    assert calls == [32, 16]  # one retry, not a search


async def test_no_retry_on_cpu_or_for_other_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(LlamaModel, "load", _fake_load(-1, calls))
    reg = ModelRegistry(EngineOptions())
    with pytest.raises(ModelLoadError):
        await reg._start("m:latest", Path("/m.gguf"), EngineOptions(gpu_layers=0))
    assert calls == [0]


@pytest.mark.parametrize(
    ("message", "oom"),
    [
        (CUDA_OOM, True),
        ("ggml_gallocr_reserve_n: failed to allocate CUDA0 buffer of size 2147483648", True),
        ("ErrorOutOfDeviceMemory", True),
        ("llama.cpp could not load /m.gguf: unknown model architecture 'foo'", False),
        ("runner exited with SIGSEGV", False),
    ],
)
def test_out_of_memory_messages(message: str, oom: bool) -> None:
    assert is_out_of_memory(message) is oom


def test_instance_keys() -> None:
    assert [instance_key("m:latest", i) for i in range(3)] == [
        "m:latest",
        "m:latest#2",
        "m:latest#3",
    ]


def test_memory_pressure_takes_the_fullest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module.probe, "ram", lambda: (100, 40))
    monkeypatch.setattr(registry_module.probe, "gpus", lambda: [])
    assert memory_pressure() == (0.6, "RAM")
    gpus = [GPU(0, "A", 100, 50, "x"), GPU(1, "B", 100, 5, "x")]
    monkeypatch.setattr(registry_module.probe, "gpus", lambda: gpus)
    used, where = memory_pressure()
    assert where == "GPU 1 memory" and used == pytest.approx(0.95)
