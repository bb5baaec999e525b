"""llama.cpp's quantizer, run in a child process, in process: a model it refuses (truncated,
already quantized through `/api/create`'s code) is a one-line 400 that leaves no file behind,
an F16 model quantizes, and an abort's last line is the reason given."""

from __future__ import annotations

from pathlib import Path

import pytest

from xllm.engine.options import EngineOptions
from xllm.engine.plugins import Engines
from xllm.engine.registry import ModelRegistry
from xllm.errors import InvalidRequest
from xllm.models import create, gguf
from xllm.models.convert import quantize
from xllm.models.names import parse_name
from xllm.models.store import MODEL, Store

LLAMA_FTYPE_MOSTLY_Q8_0 = 7


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_a_truncated_gguf_is_a_one_line_error(tiny_path: Path, tmp_path: Path) -> None:
    cut = tmp_path / "cut.gguf"
    data = tiny_path.read_bytes()
    cut.write_bytes(data[: len(data) // 2])  # the header whole, the tensors' data half gone
    with pytest.raises(quantize.QuantizeError) as e:
        quantize.quantize(cut, tmp_path / "q8.gguf", "Q8_0")
    assert e.value.status == 400 and e.value.param == "quantize"
    assert e.value.message == (
        "llama.cpp could not quantize the model to Q8_0: tensor 'token_embd.weight' data is "
        "not within the file bounds, model is corrupted or incomplete"
    )
    assert files_under(tmp_path) == {cut}  # no output, no partial file


def test_the_reason_of_an_abort_is_its_last_line() -> None:
    tail = ["[   3/  21] blk.0.attn_k.weight - [64, 64], type = f16, ",
            "/src/ggml/ggml-quants.c:5120: GGML_ASSERT(n_per_row % 32 == 0) failed", ""]  # fmt: skip
    assert quantize.reason(tail, -6) == (
        "/src/ggml/ggml-quants.c:5120: GGML_ASSERT(n_per_row % 32 == 0) failed (SIGABRT)"
    )
    assert quantize.reason([], 1) == "no output"
    said = ["llama_model_quantize: failed to quantize: requantizing from type q4_1 is disabled"]
    assert quantize.reason(said, 1) == "requantizing from type q4_1 is disabled"
    split = [
        "llama_model_quantize: failed to quantize: ",
        "Unsupported tensor size encountered",
        "",
    ]
    assert quantize.reason(split, 1) == "Unsupported tensor size encountered"


async def test_create_quantizes_f16_and_refuses_a_quantized_model(
    tiny_path: Path, tmp_path: Path
) -> None:
    store = Store(tmp_path / "models")
    registry = ModelRegistry(EngineOptions(), store=store, engines=Engines())
    digest = await store.add_file(tiny_path)
    await create.create(registry, create.Recipe(parse_name("tiny"), files={"tiny.gguf": digest}))
    recipe = create.Recipe(parse_name("tiny-q8"), from_="tiny", quantize="q8_0")
    records = await create.create(registry, recipe)
    assert "quantizing model to Q8_0" in records and records[-1] == "success"
    made = store.get(parse_name("tiny-q8"))
    assert made is not None
    layer = made.manifest.find(MODEL)
    assert layer is not None
    header = gguf.read(store.blob_path(layer.digest))
    assert header.metadata["general.file_type"] == LLAMA_FTYPE_MOSTLY_Q8_0
    before = files_under(store.root)
    with pytest.raises(InvalidRequest) as e:
        again = create.Recipe(parse_name("tiny-q4"), from_="tiny-q8", quantize="q4_0")
        await create.create(registry, again)
    assert e.value.status == 400 and e.value.param == "quantize"
    assert e.value.message == (
        "llama.cpp could not quantize the model to q4_0: requantizing from type q8_0 is disabled"
    )
    assert store.get(parse_name("tiny-q4")) is None
    assert files_under(store.root) == before  # no blob, no temporary file left
