"""The malformed-GGUF corpus (RELIABILITY item 2): one file per case of llama.cpp's
`tests/test-gguf.cpp`, Ollama's decoder tests and the CVEs behind them.

Files are real GGUF written by the `gguf` package; what it refuses to write (bad magic, huge
counts, wrong offsets…) is made by byte surgery on such a file, at field offsets that gguf-py's
own reader reports. Each case names the words the rejection must contain.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v % 2**64)


def write(path: Path, extra: Callable[[GGUFWriter], None] | None = None, **overrides: Any) -> Path:
    """A small valid llama-shaped model; `overrides` replace metadata values (None drops one)."""
    w = GGUFWriter(path, "llama")
    w.add_custom_alignment(32)  # written out, so that surgery can change it
    kv: dict[str, Any] = {
        "general.name": "corpus",
        "llama.block_count": 1,
        "llama.context_length": 64,
        "llama.embedding_length": 8,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "dup.aaaa": "x",
        "dup.bbbb": "y",
        "tokenizer.ggml.tokens": ["a", "b", "c", "d"],
        "tokenizer.ggml.scores": [0.0, -1.0, -2.0, -3.0],
        "tokenizer.ggml.token_type": [1, 1, 1, 1],
    }
    kv.update(overrides)
    for key, value in kv.items():
        if value is None:
            continue
        if isinstance(value, tuple):  # (value, type, item type) for types gguf would not infer
            w.add_key_value(key, *value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    if extra is not None:
        extra(w)
    w.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    w.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float32))
    w.add_tensor("blk.0.attn_k.weight", np.ones((4, 8), dtype=np.float32))
    w.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclass
class Base:
    """A valid file and where its fields are, for surgery."""

    data: bytes
    reader: GGUFReader

    @classmethod
    def at(cls, path: Path) -> Base:
        return cls(path.read_bytes(), GGUFReader(path))

    def field(self, key: str, part: int) -> int:
        """Byte offset of part `part` of a metadata field (0: key length, 1: key, 2: type…)."""
        f = self.reader.fields[key]
        return f.offset + sum(p.nbytes for p in f.parts[:part])

    def tensor(self, index: int, part: int) -> int:
        """Byte offset of part `part` of a tensor info (0: name length, 1: name, 2: n_dims,
        3: dims, 4: type, 5: offset)."""
        f = self.reader.tensors[index].field
        return f.offset + sum(p.nbytes for p in f.parts[:part])

    def end_of(self, index: int) -> int:
        t = self.reader.tensors[index]
        return int(t.data_offset) + int(t.n_bytes)

    def patch(self, *edits: tuple[int, bytes]) -> bytes:
        out = bytearray(self.data)
        for at, raw in edits:
            out[at : at + len(raw)] = raw
        return bytes(out)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Base, Path], bytes]
    """The file's bytes, from the base file (surgery) or the scratch dir (a new gguf file)."""
    needle: str


def _written(
    extra: Callable[[GGUFWriter], None] | None = None, **kv: Any
) -> Callable[[Base, Path], bytes]:
    def make(_: Base, scratch: Path) -> bytes:
        return write(scratch / "w.gguf", extra, **kv).read_bytes()

    return make


def _nested(depth: int) -> list[Any]:
    value: list[Any] = [1]
    for _ in range(depth - 1):
        value = [value]
    return value


T_EMBD, T_Q, T_K, T_NORM = range(4)
I8, I32, I64 = GGUFValueType.INT8, GGUFValueType.INT32, 27
ARRAY = GGUFValueType.ARRAY
Q4_0 = GGMLQuantizationType.Q4_0

CASES = [
    # header (test-gguf.cpp HANDCRAFTED_HEADER_*)
    Case("bad_magic", lambda b, _: b.patch((0, b"FUGG")), "bad magic 'FUGG'"),
    Case("version_0", lambda b, _: b.patch((4, u32(0))), "version 0"),
    Case("version_1_zero_length_string",  # Ollama's v1 decoder read zero-length strings wrong
         lambda b, _: b.patch((4, u32(1)), (b.field("general.name", 3), u64(0))), "version 1"),
    Case("version_future", lambda b, _: b.patch((4, u32(4))), "unsupported GGUF version 4"),
    Case("version_byte_swapped", lambda b, _: b.patch((4, u32(3 << 24))), "byte-swapped"),
    Case("n_tensors_huge", lambda b, _: b.patch((8, u64(-1))), "more than the"),
    Case("n_kv_huge", lambda b, _: b.patch((16, u64(-1))), "more than the"),
    Case("n_kv_and_n_tensors_huge", lambda b, _: b.patch((8, u64(2**60)), (16, u64(2**60))), "more than the"),
    Case("empty_file", lambda b, _: b"", "not a GGUF file"),
    Case("header_cut_short", lambda b, _: b.data[:20], "not a GGUF file"),
    # metadata (HANDCRAFTED_KV_*)
    Case("key_size_huge", lambda b, _: b.patch((b.field("general.name", 0), u64(-1))), "is a string of 18446744073709551615 bytes"),
    Case("key_size_past_end", lambda b, _: b.patch((b.field("general.name", 0), u64(60_000))), "needs 60000 bytes"),
    Case("key_empty", _written(lambda w: w.add_uint32("", 1)), "is empty"),
    Case("key_duplicate", lambda b, _: b.patch((b.field("dup.bbbb", 1), b"dup.aaaa")), "duplicate metadata key 'dup.aaaa'"),
    Case("key_not_utf8", lambda b, _: b.patch((b.field("dup.aaaa", 1), b"\xff")), "is not UTF-8"),
    Case("value_type_bad", lambda b, _: b.patch((b.field("general.name", 2), u32(13))), "invalid value type 13"),
    Case("value_type_huge", lambda b, _: b.patch((b.field("general.name", 2), u32(2**32 - 1))), "invalid value type 4294967295"),
    Case("array_item_type_bad", lambda b, _: b.patch((b.field("tokenizer.ggml.tokens", 3), u32(13))), "array of invalid type 13"),
    Case("string_longer_than_limit", lambda b, _: b.patch((b.field("general.name", 3), u64(2**40))), "is a string of 1099511627776 bytes (the limit"),
    Case("string_past_end", lambda b, _: b.patch((b.field("general.name", 3), u64(5000))), "needs 5000 bytes"),
    Case("token_longer_than_int32_max",  # CVE-2025-49847
         lambda b, _: b.patch((b.field("tokenizer.ggml.tokens", 5), u64(2**31 + 7))), "is a string of 2147483655 bytes"),
    Case("array_count_huge", lambda b, _: b.patch((b.field("tokenizer.ggml.tokens", 4), u64(-1))), "items (the limit is"),
    Case("array_count_past_end", lambda b, _: b.patch((b.field("tokenizer.ggml.scores", 4), u64(10**6))), "more than the"),
    Case("scores_declared_int8", _written(**{"tokenizer.ggml.scores": ([1, 2, 3, 4], ARRAY, I8)}), "must be an array of f32, not an array of i8"),
    Case("scores_shorter_than_vocab", _written(**{"tokenizer.ggml.scores": [0.0, 0.0, 0.0]}), "has 3 items but the vocabulary has 4 tokens"),
    Case("token_type_as_floats", _written(**{"tokenizer.ggml.token_type": [1.0, 1.0, 1.0, 1.0]}), "must be an array of i32, not an array of f32"),
    Case("tokens_not_an_array", _written(**{"tokenizer.ggml.tokens": "abcd"}), "must be an array of str, not str"),
    Case("arrays_nested_too_deep", _written(deep=_nested(12)), "nested more than 8 deep"),
    Case("alignment_0", lambda b, _: b.patch((b.field("general.alignment", 3), u32(0))), "0 is not a power of two"),
    Case("alignment_13", lambda b, _: b.patch((b.field("general.alignment", 3), u32(13))), "13 is not a power of two"),
    Case("alignment_2_31", lambda b, _: b.patch((b.field("general.alignment", 3), u32(2**31))), "starts past the end of the file"),
    Case("alignment_not_u32", lambda b, _: b.patch((b.field("general.alignment", 2), u32(5))), "must be a u32, not i32"),
    # tensor infos (HANDCRAFTED_TENSORS_*)
    Case("tensor_name_too_long", _written(lambda w: w.add_tensor("n" * 64, np.ones(8, np.float32))), "is a string of 64 bytes (the limit is 63)"),
    Case("tensor_name_duplicate", lambda b, _: b.patch((b.tensor(T_K, 1), b"blk.0.attn_q.weight")), "duplicate tensor name 'blk.0.attn_q.weight'"),
    Case("tensor_n_dims_5", lambda b, _: b.patch((b.tensor(T_EMBD, 2), u32(5))), "has 5 dimensions (at most 4)"),
    Case("tensor_dim_negative", lambda b, _: b.patch((b.tensor(T_EMBD, 3), u64(-1))), "negative or huge size (-1)"),
    Case("tensor_ne_overflow", lambda b, _: b.patch((b.tensor(T_Q, 3), u64(2**33) + u64(2**33))), "more than 2^63 elements"),
    Case("tensor_nbytes_overflow",
         lambda b, _: b.patch((b.tensor(T_Q, 3), u64(2**61) + u64(2)), (b.tensor(T_Q, 4), u32(I64))), "more than 2^64 bytes"),
    Case("tensor_type_unknown", lambda b, _: b.patch((b.tensor(T_Q, 4), u32(43))), "unknown ggml type 43"),
    Case("tensor_type_removed", lambda b, _: b.patch((b.tensor(T_Q, 4), u32(4))), "unknown ggml type 4"),
    Case("tensor_row_not_whole_blocks", lambda b, _: b.patch((b.tensor(T_Q, 4), u32(2))), "not a multiple of the q4_0 block size 32"),
    Case("tensor_offset_unaligned", lambda b, _: b.patch((b.tensor(T_NORM, 5), u64(int(b.reader.tensors[T_NORM].data_offset - b.reader.data_offset) + 1))), "is not a multiple of the alignment 32"),
    Case("tensor_offset_not_contiguous", lambda b, _: b.patch((b.tensor(T_EMBD, 5), u64(32))), "is at data offset 32, expected 0"),
    # tensor data (HANDCRAFTED_DATA_*, Bleeding Llama CVE-2026-7482)
    Case("bleeding_llama_one_byte_past_end", lambda b, _: b.data[: b.end_of(T_NORM) - 1], "tensor 'output_norm.weight' (32 bytes at data offset"),
    Case("bleeding_llama_offset_2_63", lambda b, _: b.patch((b.tensor(T_NORM, 5), u64(2**63))), "extends past the end of the file"),
    Case("not_enough_data", lambda b, _: b.data[: b.end_of(T_EMBD) + 8], "extends past the end of the file"),
    Case("mem_size_overflow",
         lambda b, _: b.patch((b.tensor(T_EMBD, 3), u64(0x7FFF_FFFF_FFFF_FFC0) + u64(1)), (b.tensor(T_EMBD, 4), u32(24))), "extends past the end of the file"),
]  # fmt: skip


def build(directory: Path) -> dict[str, tuple[Path, str]]:
    """Write every case to `directory/<name>.gguf`: name -> (path, expected words)."""
    directory.mkdir(parents=True, exist_ok=True)
    scratch = directory / "scratch"
    scratch.mkdir(exist_ok=True)
    base = Base.at(write(scratch / "base.gguf"))
    out = {}
    for case in CASES:
        path = directory / f"{case.name}.gguf"
        path.write_bytes(case.make(base, scratch))
        out[case.name] = (path, case.needle)
    return out


def valid_seeds(directory: Path) -> list[Path]:
    """Three small valid files: the base, every value type with nested arrays, and a custom
    alignment with a quantized tensor."""
    directory.mkdir(parents=True, exist_ok=True)

    def aligned(w: GGUFWriter) -> None:
        w.add_custom_alignment(64)
        w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 18), np.uint8), raw_dtype=Q4_0)

    types = {
        "u8": (200, GGUFValueType.UINT8, None), "i16": (-3, GGUFValueType.INT16, None),
        "u64": (2**63, GGUFValueType.UINT64, None), "f64": (0.5, GGUFValueType.FLOAT64, None),
        "b": (True, GGUFValueType.BOOL, None), "nested": ([[1, 2], [3]], ARRAY, None),
    }  # fmt: skip
    return [
        write(directory / "valid_base.gguf"),
        write(directory / "valid_types.gguf", **types),
        write(directory / "valid_aligned.gguf", aligned),
    ]


if __name__ == "__main__":
    import sys

    # `python -m tests.gguf_corpus fuzz/corpus/gguf`: the cargo-fuzz seeds
    target = Path(sys.argv[1])
    valid_seeds(target)
    for path, _ in build(target).values():
        path.rename(target / f"malformed_{path.name}")
    for leftover in (target / "scratch").iterdir():
        leftover.unlink()
    (target / "scratch").rmdir()
