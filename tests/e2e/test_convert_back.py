"""`xllm convert MODEL.gguf OUTDIR` (GGUF -> Hugging Face folder) and back to GGUF, checked on
real models: SmolLM2's Q4_1 comes back bit for bit once requantized and generates the same
text; Qwen2.5-Coder, Gemma 3 270M and MiniLM keep every tensor and token id; a tiny random
Gemma 3 folder converts to a GGUF whose logits equal a numpy forward pass."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFWriter, quants
from llama_cpp import Llama
from tokenizers import Tokenizer

from tests.convert_models import gemma3_logits, read_safetensors, tiny_gemma3
from tests.e2e.test_convert import xllm

SENTENCES = [
    "Hello world!  Two  spaces\n\n\nnewlines\tand tabs",
    "naïve café déjà-vu, 3.14 x##y UPPER case 1234567",
    "日本語のテキスト and emojis 🦙",
    "    def f(x):\n        return x**2  # comment",
]
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                  "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
                  "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id",
                  "tokenizer.ggml.add_bos_token", "tokenizer.chat_template")  # fmt: skip


def to_folder(gguf: Path, out: Path) -> dict[str, Any]:
    done = xllm("convert", str(gguf), str(out))
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}/" in done.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }
    return dict(json.loads((out / "config.json").read_text()))


def to_gguf(folder: Path, out: Path, *args: str) -> GGUFReader:
    done = xllm("convert", str(folder), str(out), *args)
    assert done.returncode == 0, done.stderr
    return GGUFReader(out)


def dequantized(r: GGUFReader) -> dict[str, np.ndarray]:
    return {t.name: quants.dequantize(np.asarray(t.data), t.tensor_type) for t in r.tensors}


def fields(r: GGUFReader, keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: r.fields[k].contents() for k in keys if k in r.fields}


def safetensors_types(path: Path) -> dict[str, str]:
    n = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + n])
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def same_token_ids(original: Path, remade: Path, folder: Path, *texts: str) -> None:
    """llama.cpp's tokenizer on both GGUFs and `tokenizers` on the folder's tokenizer.json
    agree (BOS as each adds it, special tokens parsed)."""
    a = Llama(str(original), vocab_only=True, verbose=False)
    b = Llama(str(remade), vocab_only=True, verbose=False)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    for s in [*SENTENCES, *texts]:
        want = a.tokenize(s.encode(), add_bos=True, special=True)
        assert b.tokenize(s.encode(), add_bos=True, special=True) == want, s
        assert tok.encode(s).ids == want, s


def test_smollm2_round_trip_bit_exact_and_same_output(smollm2_path: Path, tmp_path: Path) -> None:
    config = to_folder(smollm2_path, tmp_path / "hf")
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert config["rms_norm_eps"] == 1e-5 and config["tie_word_embeddings"] is True
    # Q4_1 and Q8_0 dequantized to F32; the F32 norms copied
    assert set(safetensors_types(tmp_path / "hf" / "model.safetensors").values()) == {"F32"}
    original = GGUFReader(smollm2_path)
    # to F32: every value the quantized blocks stand for, exactly
    f32 = to_gguf(tmp_path / "hf", tmp_path / "f32.gguf", "--outtype", "f32")
    want, got = dequantized(original), dequantized(f32)
    assert want.keys() == got.keys()
    for name, values in want.items():
        assert np.array_equal(got[name], values), name
    assert fields(f32, TOKENIZER_KEYS) == fields(original, TOKENIZER_KEYS)
    assert fields(f32, TOKENIZER_KEYS)["tokenizer.ggml.pre"] == "smollm"  # the hash reproduced
    same_token_ids(smollm2_path, tmp_path / "f32.gguf", tmp_path / "hf", "<|im_start|>user\nhi")
    # requantized as it was: the very same blocks, hence the same greedy text
    q = to_gguf(tmp_path / "hf", tmp_path / "q4_1.gguf", "--outtype", "f32", "-q", "Q4_1")
    remade = {t.name: t for t in q.tensors}
    for t in original.tensors:
        assert remade[t.name].tensor_type == t.tensor_type, t.name
        assert np.array_equal(np.asarray(remade[t.name].data), np.asarray(t.data)), t.name
    texts = [
        Llama(str(p), n_ctx=128, verbose=False).create_completion(
            "The capital of France is", max_tokens=16, temperature=0
        )["choices"][0]["text"]
        for p in (smollm2_path, tmp_path / "q4_1.gguf")
    ]
    assert texts[0] == texts[1] and len(texts[0]) > 10


def test_qwen2_round_trip(qwen_tools_path: Path, tmp_path: Path) -> None:
    config = to_folder(qwen_tools_path, tmp_path / "hf")
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["num_key_value_heads"] == 2
    f32 = to_gguf(tmp_path / "hf", tmp_path / "f32.gguf", "--outtype", "f32")
    want, got = dequantized(GGUFReader(qwen_tools_path)), dequantized(f32)
    assert want.keys() == got.keys()
    for name, values in want.items():
        assert np.array_equal(got[name], values), name
    assert fields(f32, TOKENIZER_KEYS) == fields(GGUFReader(qwen_tools_path), TOKENIZER_KEYS)
    same_token_ids(qwen_tools_path, tmp_path / "f32.gguf", tmp_path / "hf",
                   "<|im_start|>user\nhi<|im_end|>", "<|fim_prefix|>def f(<|fim_suffix|>")  # fmt: skip


def test_gemma3_round_trip(gemma3_path: Path, tmp_path: Path) -> None:
    config = to_folder(gemma3_path, tmp_path / "hf")
    assert config["model_type"] == "gemma3_text" and config["head_dim"] == 256
    assert config["layer_types"][:6] == ["sliding_attention"] * 5 + ["full_attention"]
    f32 = to_gguf(tmp_path / "hf", tmp_path / "f32.gguf", "--outtype", "f32")
    want, got = dequantized(GGUFReader(gemma3_path)), dequantized(f32)
    assert want.keys() == got.keys()
    for name, values in want.items():
        # norms went w + 1 -> w -> w + 1 in F32: within an ulp; the rest exactly
        tolerance = 2e-7 * np.abs(values).max() if name.endswith("norm.weight") else 0
        assert np.abs(got[name] - values).max() <= tolerance, name
    keys = tuple(k for k in TOKENIZER_KEYS if k != "tokenizer.ggml.merges")
    assert fields(f32, keys) == fields(GGUFReader(gemma3_path), keys)
    same_token_ids(gemma3_path, tmp_path / "f32.gguf", tmp_path / "hf",
                   "<start_of_turn>user\nhi<end_of_turn>\n", "tab\there\u00a0nbsp")  # fmt: skip


def test_minilm_f32_round_trip_is_bit_exact(minilm_dir: Path, tmp_path: Path) -> None:
    to_gguf(minilm_dir, tmp_path / "m.gguf", "--outtype", "f32")
    config = to_folder(tmp_path / "m.gguf", tmp_path / "hf")
    assert config["model_type"] == "bert" and config["type_vocab_size"] == 2
    pooling = json.loads((tmp_path / "hf" / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] is True and not pooling["pooling_mode_cls_token"]
    want = read_safetensors(minilm_dir / "model.safetensors")
    got = read_safetensors(tmp_path / "hf" / "model.safetensors")
    kept = {k for k in want if not k.startswith("pooler.") and "position_ids" not in k}
    assert got.keys() == kept
    for name in kept:
        assert np.array_equal(got[name], want[name]), name
    tok, ref = (
        Tokenizer.from_file(str(p / "tokenizer.json")) for p in (tmp_path / "hf", minilm_dir)
    )
    ref.no_padding()
    for s in [*SENTENCES, "[CLS] already [SEP] [MASK]"]:
        assert tok.encode(s).ids == ref.encode(s).ids, s


def bf16_tensors(path: Path) -> dict[str, np.ndarray]:
    """The BF16 tensors of a safetensors file, widened to F32."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    out = {}
    for name, t in json.loads(raw[8 : 8 + n]).items():
        if name != "__metadata__" and t["dtype"] == "BF16":
            a, b = t["data_offsets"]
            bits = np.frombuffer(raw[8 + n + a : 8 + n + b], "<u2").astype(np.uint32) << 16
            out[name] = bits.view(np.float32).reshape(t["shape"])
    return out


def test_minilm_bf16_kept_and_outtype_cast(minilm_dir: Path, tmp_path: Path) -> None:
    """A BF16 GGUF's weights stay BF16, bit for bit (the original's rounded to nearest even);
    `--outtype f16` casts every tensor, norms included."""
    to_gguf(minilm_dir, tmp_path / "m.gguf", "--outtype", "bf16")
    to_folder(tmp_path / "m.gguf", tmp_path / "hf")
    want = read_safetensors(minilm_dir / "model.safetensors")
    types = safetensors_types(tmp_path / "hf" / "model.safetensors")
    got = bf16_tensors(tmp_path / "hf" / "model.safetensors")
    assert got.keys() == {k for k, t in types.items() if t == "BF16"}
    assert "encoder.layer.0.attention.self.query.weight" in got
    assert types["encoder.layer.0.attention.self.query.bias"] == "F32"
    for name, values in got.items():
        bits = want[name].view(np.uint32)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16).view(np.float32)
        assert np.array_equal(values, rounded), name
    done = xllm("convert", str(tmp_path / "m.gguf"), str(tmp_path / "f16"), "--outtype", "f16")
    assert done.returncode == 0, done.stderr
    assert set(safetensors_types(tmp_path / "f16" / "model.safetensors").values()) == {"F16"}


def test_tiny_gemma3_logits_match_numpy_and_round_trip(tmp_path: Path) -> None:
    config = tiny_gemma3(tmp_path / "hf")
    r = to_gguf(tmp_path / "hf", tmp_path / "m.gguf", "--outtype", "f32")
    m = fields(r, ("general.architecture", "gemma3.attention.key_length",
                   "gemma3.attention.sliding_window", "tokenizer.ggml.model",
                   "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.bos_token_id"))  # fmt: skip
    assert m == {"general.architecture": "gemma3", "gemma3.attention.key_length": 32,
                 "gemma3.attention.sliding_window": 512, "tokenizer.ggml.model": "llama",
                 "tokenizer.ggml.add_space_prefix": False, "tokenizer.ggml.bos_token_id": 2}  # fmt: skip
    assert "output.weight" not in {t.name for t in r.tensors}  # tied
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    model = Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    for s in [*SENTENCES, "<start_of_turn>user\nhi<end_of_turn>"]:
        assert model.tokenize(s.encode(), add_bos=True, special=True) == tok.encode(s).ids, s
    ids = tok.encode("The quick brown fox is the capital of France.").ids
    model.eval(ids)
    got = np.array(model.scores[: len(ids)])
    want = gemma3_logits(read_safetensors(tmp_path / "hf" / "model.safetensors"), config, ids)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()
    r = model.create_completion("Hello world", max_tokens=6, temperature=0)
    assert r["usage"]["completion_tokens"] > 0
    # and back: the same tensors (norms within an ulp of w + 1), the same config
    back = to_folder(tmp_path / "m.gguf", tmp_path / "back")
    for key in ("head_dim", "sliding_window", "layer_types", "query_pre_attn_scalar",
                "num_key_value_heads", "rope_theta", "rope_local_base_freq", "vocab_size"):  # fmt: skip
        assert back[key] == config[key], key
    before = read_safetensors(tmp_path / "hf" / "model.safetensors")
    after = read_safetensors(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, values in before.items():
        assert np.abs(after[name] - values).max() <= 2.4e-7, name


def test_convert_back_refusals(smollm2_path: Path, tmp_path: Path) -> None:
    w = GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    done = xllm("convert", str(tmp_path / "mamba.gguf"), str(tmp_path / "out"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "'mamba'" in done.stderr and "llama" in done.stderr and "gemma3" in done.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    done = xllm("convert", str(smollm2_path), str(tmp_path / "full"))
    assert done.returncode == 1 and "exists" in done.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    for args in (["-q", "Q4_K_M"], ["--outtype", "q8_0"]):
        done = xllm("convert", str(smollm2_path), str(tmp_path / "out"), *args)
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full", "mamba.gguf"]  # nothing left
