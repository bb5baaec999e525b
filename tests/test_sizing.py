"""What-if plans: the KV cache, weights and backend arithmetic as tables, the binary search's
exact boundary, and model shapes from Hugging Face configs."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import pytest

from xllm.errors import InvalidRequest
from xllm.memory import planner, shape, sizing
from xllm.memory.shape import Shape
from xllm.memory.sizing import Model, Setting
from xllm.models import gguf

# Llama-3-8B (GQA: 8 KV heads for 32 heads) and Llama-2-7B (MHA)
LLAMA3 = Shape(8_030_261_248, 32, 4096, 32, 8, 128, 128256, 8192)
LLAMA2 = Shape(6_738_415_616, 32, 4096, 32, 32, 128, 32000, 4096)


@pytest.mark.parametrize(
    ("model", "ctx", "kv_type", "expected"),
    [
        # 2 x layers x KV heads x head dim x context x bytes
        (LLAMA3, 8192, "f16", 2 * 32 * 8 * 128 * 8192 * 2),  # 1 GiB
        (LLAMA3, 1, "f16", 131072),  # 128 KiB per token
        (LLAMA3, 8192, "q8_0", 2 * 32 * 8 * 128 * 8192 * 34 // 32),
        (LLAMA3, 8192, "q4_0", 2 * 32 * 8 * 128 * 8192 * 18 // 32),
        (LLAMA2, 4096, "f16", 2 * 32 * 32 * 128 * 4096 * 2),  # 2 GiB
        (LLAMA2, 1, "f16", 524288),  # MHA: four times Llama 3's per token
    ],
)
def test_kv_cache_table(model: Shape, ctx: int, kv_type: str, expected: int) -> None:
    s = Setting("fp16", kv_type, 1, 512, "llama.cpp")
    assert sizing.footprint(Model("m", model), s, ctx).kv == expected


@pytest.mark.parametrize(
    ("quant", "weights"),
    [("fp32", 4 * 8_030_261_248), ("fp16", 2 * 8_030_261_248), ("bf16", 2 * 8_030_261_248),
     ("int8", 8_030_261_248), ("int4", 8_030_261_248 // 2), ("q8_0", 8_030_261_248 * 8.5 / 8),
     ("q4_k", 8_030_261_248 * 4.5 / 8)],
)  # fmt: skip
def test_weights_table(quant: str, weights: float) -> None:
    f = sizing.footprint(Model("m", LLAMA3), Setting(quant, "f16", 1, 512, "llama.cpp"), 1)
    assert f.weights == int(weights)
    assert f.activations == 512 * 128256 * 4 + planner.ACTIVATIONS + 128256 * 4


@pytest.mark.parametrize(
    ("backend", "quant", "ctx", "overhead"),
    [
        ("llama.cpp", "fp16", 1000, lambda w, kv, a: 0),
        ("transformers", "fp16", 1000, lambda w, kv, a: (w + kv + a) * 0.15),
        ("autogptq", "int4", 1000, lambda w, kv, a: (w + kv + a) * 0.08),
        ("vllm", "fp16", 1000, lambda w, kv, a: (w + a) * 0.10),  # the KV cache is exact
    ],
)
def test_backend_factors(backend: str, quant: str, ctx: int, overhead: object) -> None:
    f = sizing.footprint(Model("m", LLAMA3), Setting(quant, "f16", 2, 512, backend), ctx)
    assert callable(overhead)
    assert f.overhead == pytest.approx(overhead(f.weights, f.kv, f.activations), abs=2)
    blocks = 1008 if backend == "vllm" else 1000  # vLLM allocates blocks of 16 tokens
    assert f.kv == 2 * 32 * 8 * 128 * blocks * 2 * 2


def test_vllm_rounds_the_kv_cache_up_to_blocks() -> None:
    m = Model("m", LLAMA3)
    s = Setting("fp16", "f16", 1, 512, "vllm")
    per_token = 131072
    assert sizing.footprint(m, s, 1).kv == 16 * per_token
    assert sizing.footprint(m, s, 16).kv == 16 * per_token
    assert sizing.footprint(m, s, 17).kv == 32 * per_token


@pytest.mark.parametrize("backend", list(sizing.BACKENDS))
@pytest.mark.parametrize("kv_type", sizing.KV_TYPES)
@pytest.mark.parametrize("wanted", [1, 777, 5000, 8192])
def test_binary_search_finds_the_exact_boundary(backend: str, kv_type: str, wanted: int) -> None:
    m = Model("m", LLAMA3)
    quant = "int4" if backend == "autogptq" else "fp16"
    s = Setting(quant, kv_type, 2, 512, backend)
    available = sizing.footprint(m, s, wanted).total
    found = sizing.max_context(m, s, available)
    block = sizing.BACKENDS[backend].block
    assert found >= wanted and found - wanted < block  # the rest of its last block
    assert sizing.footprint(m, s, found).total <= available
    if found < m.search_limit:
        assert sizing.footprint(m, s, found + 1).total > available  # the next one up does not


def test_binary_search_bounds_and_speed() -> None:
    m = Model("m", replace(LLAMA3, context_length=None))
    s = Setting("int4", "q4_0", 1, 512, "llama.cpp")
    start = time.perf_counter()
    assert sizing.max_context(m, s, 10**15) == sizing.MAX_SEARCH
    assert sizing.max_context(m, s, 0) == 0
    assert sizing.max_context(Model("m", LLAMA3), s, 10**15) == 8192  # the model's own context
    assert time.perf_counter() - start < 1


def test_gguf_at_its_own_quantization_is_the_llama_cpp_plan(smollm2_path: Path) -> None:
    g = gguf.read(smollm2_path)
    m = Model("smol", shape.from_gguf(g), g)
    for kv_type in sizing.KV_TYPES:
        s = Setting(sizing.FILE, kv_type, 4, 512, "llama.cpp", on_cpu=True)
        plan = planner.estimate(g, ctx_size=1024, parallel=4, batch_size=512, kv_type=kv_type)
        assert sizing.footprint(m, s, 1024).total == plan.total
        ours = sizing.max_context(m, s, 300 * 1024 * 1024)
        theirs = planner.max_context(
            g, available=300 * 1024 * 1024, parallel=4, batch_size=512, kv_type=kv_type
        )
        assert ours == theirs
    sh = m.shape
    assert (sh.layers, sh.heads, sh.kv_heads, sh.head_dim, sh.vocab) == (30, 9, 3, 64, 49152)
    # the generic formula agrees with llama.cpp's KV cache for this GQA model
    generic = sizing.footprint(m, Setting("fp16", "f16", 4, 512, "llama.cpp"), 1024).kv
    assert generic == planner.kv_bytes(g, 4096)


def test_layers_that_fit() -> None:
    m = Model("m", LLAMA3)
    s = Setting("fp16", "f16", 1, 512, "llama.cpp")
    f = sizing.footprint(m, s, 4096)
    per_layer = (f.weights - 128256 * 4096 * 2) / 32 + f.kv / 32
    assert sizing.layers_that_fit(m, s, 4096, int(f.activations + 10 * per_layer) + 1) == 10
    assert sizing.layers_that_fit(m, s, 4096, f.activations) == 0


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": 14336,
          "max_position_embeddings": 131072},
         Shape(8_030_261_248 - 4096 * 65, 32, 4096, 32, 8, 128, 128256, 131072)),
        ({"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "n_positions": 1024,
          "tie_word_embeddings": True},
         Shape(50257 * 768 + 12 * (4 * 768 * 768 + 3 * 768 * 3072), 12, 768, 12, 12, 64, 50257, 1024)),
        ({"architectures": ["Gemma3ForConditionalGeneration"],
          "text_config": {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                          "num_key_value_heads": 1, "head_dim": 32, "vocab_size": 100,
                          "intermediate_size": 128, "tie_word_embeddings": True}},
         Shape(100 * 64 + 2 * (2 * 64 * 128 + 2 * 64 * 32 + 3 * 64 * 128), 2, 64, 4, 1, 32, 100, None)),
    ],
)  # fmt: skip
def test_shape_from_hf_config(config: dict[str, object], expected: Shape) -> None:
    assert shape.from_hf_config(config) == expected


def test_hf_config_without_a_shape() -> None:
    with pytest.raises(InvalidRequest, match="no layers, hidden_size, heads") as e:
        shape.from_hf_config({"model_type": "bert-ish"})
    assert e.value.param == "hf"
