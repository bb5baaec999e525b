"""`xllm convert` (safetensors -> GGUF, no torch) checked against the models it comes from:
MiniLM's token ids equal Hugging Face `tokenizers`' and its embeddings, served by a real
`xllm serve` through the openai and ollama clients, equal a numpy BertModel's; tiny random
llama and qwen2 folders give the logits of a numpy forward pass; Q4_K_M loads and runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import ollama
import openai
import pytest
from gguf import GGMLQuantizationType, GGUFReader
from llama_cpp import Llama
from tokenizers import Tokenizer

from tests.conftest import Server, start_server, stop_server
from tests.convert_models import bert_embedding, causal_logits, read_safetensors, tiny_causal

SENTENCES = ["Hello world!", "The quick brown fox jumps over the lazy dog.",
             "naïve café déjà-vu, 3.14 x##y [MASK] UPPER case", "日本語のテキスト and emojis 🦙"]  # fmt: skip


def xllm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xllm", *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})})  # fmt: skip


def cosine(a: Any, b: Any) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def meta(path: Path) -> dict[str, Any]:
    r = GGUFReader(path)
    return {
        k: f.contents() for k, f in r.fields.items() if not k.startswith("tokenizer.ggml.token")
    }


@pytest.fixture(scope="module")
def minilm_gguf(minilm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("convert") / "minilm.gguf"
    t0 = time.perf_counter()
    done = xllm("convert", str(minilm_dir), str(out))
    print(f"convert MiniLM: {time.perf_counter() - t0:.2f} s")
    assert done.returncode == 0, done.stderr
    assert "converting" in done.stderr and f"wrote {out}" in done.stderr
    return out


@pytest.fixture(scope="module")
def reference(minilm_dir: Path) -> Any:
    weights = read_safetensors(minilm_dir / "model.safetensors")
    config = json.loads((minilm_dir / "config.json").read_text())
    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_padding()
    return lambda s: bert_embedding(weights, config, tok.encode(s).ids)


def test_minilm_metadata_and_token_ids(minilm_gguf: Path, minilm_dir: Path) -> None:
    m = meta(minilm_gguf)
    assert m["general.architecture"] == "bert" and m["bert.block_count"] == 6
    assert m["bert.embedding_length"] == 384 and m["bert.pooling_type"] == 1  # mean
    assert m["bert.attention.causal"] is False and m["tokenizer.ggml.model"] == "bert"
    # llama.cpp's converter: this tokenizer's hash is listed as bert-bge, then jina-v2-en (last wins)
    assert m["tokenizer.ggml.pre"] == "jina-v2-en"
    assert (m["tokenizer.ggml.bos_token_id"], m["tokenizer.ggml.seperator_token_id"]) == (101, 102)
    tok = Tokenizer.from_file(str(minilm_dir / "tokenizer.json"))
    tok.no_padding()
    model = Llama(str(minilm_gguf), vocab_only=True, verbose=False)
    for s in SENTENCES:
        assert model.tokenize(s.encode(), add_bos=True, special=True) == tok.encode(s).ids, s


@pytest.fixture(scope="module")
def served(minilm_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("serve-minilm"), ["--model", str(minilm_gguf)])
    yield s
    stop_server(s)


def test_minilm_embeddings_served_match_reference(served: Server, reference: Any) -> None:
    oa = openai.OpenAI(base_url=f"{served.url}/v1", api_key="x")
    name = oa.models.list().data[0].id
    got = oa.embeddings.create(model=name, input=SENTENCES).data
    ol = ollama.Client(host=served.url).embed(model=name, input=SENTENCES).embeddings
    for s, a, b in zip(SENTENCES, got, ol, strict=True):
        want = reference(s)
        assert len(a.embedding) == 384 and cosine(a.embedding, want) >= 0.999, s
        assert cosine(b, want) >= 0.999, s


def test_quantized_minilm_still_embeds(minilm_dir: Path, tmp_path: Path, reference: Any) -> None:
    out = tmp_path / "q.gguf"
    done = xllm("convert", str(minilm_dir), str(out), "--quantize", "Q4_K_M")
    assert done.returncode == 0, done.stderr
    assert "quantizing Q4_K_M" in done.stderr and not list(tmp_path.glob(".*"))  # no leftovers
    assert meta(out)["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    model = Llama(str(out), embedding=True, verbose=False)
    vec = model.embed(SENTENCES[1])
    assert cosine(vec, reference(SENTENCES[1])) > 0.98


def test_failing_quantizer_is_a_one_line_error(minilm_dir: Path, tmp_path: Path) -> None:
    """llama.cpp refuses IQ2_XXS without an importance matrix for MiniLM's 1536-wide ffn_down
    (its child process exits with an error): the CLI says why in one line, and neither the
    output, nor the F16 GGUF made first, nor the quantizer's partial file stays."""
    done = xllm("convert", str(minilm_dir), str(tmp_path / "q.gguf"), "--quantize", "IQ2_XXS")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.rstrip().splitlines()[-1] == (
        "Error: llama.cpp could not quantize the model to IQ2_XXS: "
        "this quantization requires an imatrix!"
    )
    assert "converting" in done.stderr and "wrote" not in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_tiny_causal_outtype_q8_0(tmp_path: Path) -> None:
    tiny_causal(tmp_path / "hf", "llama", seed=2)
    out = tmp_path / "q8.gguf"
    done = xllm("convert", str(tmp_path / "hf"), str(out), "--outtype", "q8_0")
    assert done.returncode == 0, done.stderr
    types = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    matrices = {n for n in types if not n.endswith("norm.weight")}
    assert len(matrices) == 2 + 7 * 2  # embeddings, output, seven per layer
    assert {types[n] for n in matrices} == {GGMLQuantizationType.Q8_0}  # type 8
    assert {t for n, t in types.items() if n not in matrices} == {GGMLQuantizationType.F32}
    assert meta(out)["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    model = Llama(str(out), n_ctx=64, verbose=False)
    r = model.create_completion("Hello world", max_tokens=6, temperature=0)
    assert r["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_causal_logits_match_numpy(arch: str, tmp_path: Path) -> None:
    config = tiny_causal(tmp_path / "hf", arch)
    out = tmp_path / "m.gguf"
    done = xllm("convert", str(tmp_path / "hf"), str(out), "--outtype", "f32")
    assert done.returncode == 0, done.stderr
    m = meta(out)
    assert m["general.architecture"] == arch and m["tokenizer.ggml.model"] == "gpt2"
    assert "<|im_start|>" in m["tokenizer.chat_template"] and len(m["tokenizer.ggml.merges"]) > 0
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    model = Llama(str(out), n_ctx=64, logits_all=True, verbose=False)
    text = "The quick brown fox is the capital of France."
    ids = tok.encode(text).ids
    assert model.tokenize(text.encode(), add_bos=False, special=False) == ids
    model.eval(ids)
    got = np.array(model.scores[: len(ids)])
    want = causal_logits(read_safetensors(tmp_path / "hf" / "model.safetensors"), config, ids)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()
    gen = [
        model.create_completion(text, max_tokens=8, temperature=0)["choices"][0]["text"]
        for _ in range(2)
    ]
    assert gen[0] == gen[1]
    # and back to a folder: the same tensors bit for bit (F32 throughout), the same config
    done = xllm("convert", str(out), str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "intermediate_size", "rope_theta", "vocab_size"):  # fmt: skip
        assert back[key] == config[key], key
    before = read_safetensors(tmp_path / "hf" / "model.safetensors")
    after = read_safetensors(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, values in before.items():
        assert np.array_equal(after[name], values), name
    back_tok = Tokenizer.from_file(str(tmp_path / "back" / "tokenizer.json"))
    assert back_tok.encode(text).ids == ids


def test_llama3_rope_scaling_becomes_rope_freqs(tmp_path: Path) -> None:
    """Llama 3.2's rope scaling on a head size whose frequencies fall on both sides of the
    ramp and in it: llama.cpp reads the converter's rope_freqs and gives the logits of a numpy
    forward pass with Hugging Face's llama3 frequencies; converted back, the same scaling."""
    scaling = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip
    config = tiny_causal(tmp_path / "hf", "llama", rope_theta=500000.0, rope_scaling=scaling)
    out = tmp_path / "m.gguf"
    done = xllm("convert", str(tmp_path / "hf"), str(out), "--outtype", "f32")
    assert done.returncode == 0, done.stderr
    freqs = {t.name: np.asarray(t.data) for t in GGUFReader(out).tensors}["rope_freqs.weight"]
    assert freqs.shape == (8,) and freqs.min() == 1 and freqs.max() == 32
    assert ((freqs > 1) & (freqs < 32)).any()  # the smooth ramp
    tok = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json"))
    ids = tok.encode("The quick brown fox is the capital of France. " * 3).ids
    model = Llama(str(out), n_ctx=128, logits_all=True, verbose=False)
    model.eval(ids)
    got = np.array(model.scores[: len(ids)])
    want = causal_logits(read_safetensors(tmp_path / "hf" / "model.safetensors"), config, ids)
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max(), np.abs(got - want).max()
    unscaled = causal_logits(
        read_safetensors(tmp_path / "hf" / "model.safetensors"),
        {**config, "rope_scaling": None},
        ids,
    )
    assert np.abs(unscaled - want).max() > 10 * np.abs(got - want).max()  # the scaling mattered
    done = xllm("convert", str(out), str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert back["rope_scaling"] == scaling and back["rope_theta"] == 500000.0


def test_mixture_of_experts_is_refused(tmp_path: Path) -> None:
    tiny_causal(tmp_path / "hf", "qwen2")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for arch, extra in (("MixtralForCausalLM", {"num_local_experts": 8}),
                        ("Qwen2ForCausalLM", {"num_experts": 60}),
                        ("LlamaForCausalLM", {"num_local_experts": 4})):  # fmt: skip
        (tmp_path / "hf" / "config.json").write_text(
            json.dumps({**config, "architectures": [arch], **extra})
        )
        done = xllm("convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"))
        assert done.returncode == 1 and "Traceback" not in done.stderr
        n = next(iter(extra.values()))
        assert f"{arch!r} cannot be converted (a mixture of {n} experts)" in done.stderr
        assert "MistralForCausalLM" in done.stderr and "Gemma3ForCausalLM" in done.stderr
        assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tiny_causal_q4_k_m_generates(arch: str, tmp_path: Path) -> None:
    tiny_causal(tmp_path / "hf", arch, seed=1)
    out = tmp_path / "q.gguf"
    done = xllm("convert", str(tmp_path / "hf"), str(out), "-q", "q4_k_m")
    assert done.returncode == 0, done.stderr
    model = Llama(str(out), n_ctx=64, verbose=False)
    r = model.create_completion("Hello world", max_tokens=6, temperature=0)
    assert r["usage"]["completion_tokens"] > 0


def test_unsupported_architecture_and_bad_input(tmp_path: Path) -> None:
    tiny_causal(tmp_path / "hf", "llama")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**config, "architectures": ["MambaForCausalLM"]})
    )
    done = xllm("convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert (
        "'MambaForCausalLM'" in done.stderr
        and "LlamaForCausalLM" in done.stderr
        and "BertModel" in done.stderr
    )
    assert not (tmp_path / "x.gguf").exists()
    done = xllm("convert", str(tmp_path), str(tmp_path / "x.gguf"))
    assert done.returncode == 1 and "no config.json" in done.stderr
    done = xllm("convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"), "--quantize", "Q9_Z")
    assert done.returncode == 1 and "Q4_K_M" in done.stderr
    for broken in ({"num_attention_heads": None}, {"rope_theta": "fast"}):
        key = next(iter(broken))
        (tmp_path / "hf" / "config.json").write_text(
            json.dumps({k: v for k, v in {**config, **broken}.items() if v is not None})
        )
        done = xllm("convert", str(tmp_path / "hf"), str(tmp_path / "x.gguf"))
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        assert "config.json" in done.stderr or key in done.stderr, done.stderr
        assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def store_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("serve-create"), [], wait_model=False)
    yield s
    stop_server(s)


def test_create_from_hf_folder_embeds(
    store_server: Server, minilm_dir: Path, tmp_path: Path, reference: Any
) -> None:
    (tmp_path / "Modelfile").write_text(f"FROM {minilm_dir}\n")
    env = {"XLLM_HOST": f"127.0.0.1:{store_server.port}"}
    done = xllm("create", "minilm", "-f", str(tmp_path / "Modelfile"), env=env)
    assert done.returncode == 0, done.stderr
    assert "converting model" in done.stderr and "success" in done.stderr
    oa = openai.OpenAI(base_url=f"{store_server.url}/v1", api_key="x")
    a = oa.embeddings.create(model="minilm", input=SENTENCES[0]).data[0].embedding
    b = ollama.Client(host=store_server.url).embed(model="minilm", input=SENTENCES[0]).embeddings[0]
    assert (
        cosine(a, reference(SENTENCES[0])) >= 0.999 and cosine(b, reference(SENTENCES[0])) >= 0.999
    )


def test_create_from_hf_folder_quantized_chats(store_server: Server, tmp_path: Path) -> None:
    tiny_causal(tmp_path / "hf", "qwen2")
    (tmp_path / "Modelfile").write_text("FROM ./hf\nPARAMETER num_predict 8\n")
    env = {"XLLM_HOST": f"127.0.0.1:{store_server.port}"}
    done = xllm("create", "tiny-qwen", "-f", str(tmp_path / "Modelfile"), "-q", "Q4_K_M", env=env)
    assert done.returncode == 0, done.stderr
    client = ollama.Client(host=store_server.url)
    shown = client.show("tiny-qwen")
    assert shown.details is not None and shown.details.quantization_level == "Q4_K_M"
    assert shown.modelinfo is not None and shown.modelinfo["general.architecture"] == "qwen2"
    msgs = [{"role": "user", "content": "Hello world"}]
    r = client.chat(model="tiny-qwen", messages=msgs, options={"temperature": 0})
    assert r.eval_count and r.eval_count > 0
    oa = openai.OpenAI(base_url=f"{store_server.url}/v1", api_key="x")
    c = oa.chat.completions.create(model="tiny-qwen", messages=msgs, temperature=0, max_tokens=8)  # type: ignore[arg-type]
    assert c.usage is not None and c.usage.completion_tokens > 0
