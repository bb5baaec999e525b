"""`xllm compare` on real models, as a user runs it: SmolLM2 with itself (equal perplexity, no
divergence, same outputs), two quantizations that `xllm convert --quantize` made of it (SmolLM2
-> Hugging Face folder -> Q8_0 and Q4_K_M: divergence), its perplexity against an independent
numpy computation over llama-cpp-python's logits, and the refusals (an embedding model, a text
too short) as messages, never tracebacks."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_cpp import Llama

from tests.e2e.test_convert_back import to_folder
from xllm.models import gguf

CTX = 128
CHUNKS = 2
PROMPTS = ["The capital of France is", "Once upon a time"]
TEXT = Path(__file__).parents[2] / "python" / "xllm" / "data" / "pride_and_prejudice.txt"


def xllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xllm", *args], capture_output=True, text=True,
                          timeout=600, env=os.environ.copy())  # fmt: skip


def compare(a: Path, b: Path, prompts: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return xllm("compare", str(a), str(b), "--ctx", str(CTX), "--chunks", str(CHUNKS),
                "--prompts", str(prompts), "--max-tokens", "8", *extra)  # fmt: skip


def reference_ppl(model: Path) -> float:
    """llama-perplexity's number computed independently: every logit of each chunk from
    llama-cpp-python's high-level API, log-softmax in float64, the second half scored."""
    # flash attention as llama-perplexity has it (llama.cpp's default "auto" turns it on for
    # the CPU; llama-cpp-python's Llama turns it off, which moves SmolLM2's PPL by ~1 %)
    llm = Llama(str(model), n_ctx=CTX, n_batch=CTX, logits_all=True, flash_attn=True,
                verbose=False)  # fmt: skip
    tokens = llm.tokenize(TEXT.read_text("utf-8").encode(), add_bos=True, special=False)
    adds_bos = tokens[0] == llm.token_bos()  # SmolLM2's vocabulary does not
    nll: list[float] = []
    for c in range(CHUNKS):
        chunk = tokens[c * CTX : (c + 1) * CTX]
        if adds_bos:
            chunk[0] = llm.token_bos()
        llm.reset()
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:CTX], np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        first = CTX // 2
        nll += [-logp[i, chunk[i + 1]] for i in range(first, CTX - 1)]
    return math.exp(sum(nll) / len(nll))


@pytest.fixture(scope="module")
def prompts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("compare") / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n\n")  # a blank line is not a prompt
    return p


@pytest.fixture(scope="module")
def quantized(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmolLM2 as a Hugging Face folder (`xllm convert MODEL.gguf DIR`), then quantized from that
    folder by `xllm convert DIR OUT.gguf --quantize TYPE` to Q8_0 and to Q4_K_M."""
    root = tmp_path_factory.mktemp("quantized")
    to_folder(smollm2_path, root / "hf")
    made: dict[str, Path] = {}
    for kind in ("Q8_0", "Q4_K_M"):
        made[kind] = root / f"smollm2-{kind.lower()}.gguf"
        done = xllm("convert", str(root / "hf"), str(made[kind]), "--quantize", kind)
        assert done.returncode == 0, done.stderr
        assert f"quantizing {kind}" in done.stderr
    shutil.rmtree(root / "hf")  # ~0.5 GB of F32 the tests need no more
    assert sorted(p.name for p in root.iterdir()) == sorted(p.name for p in made.values())
    return made


def as_json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def test_compare_with_itself(smollm2_path: Path, prompts: Path) -> None:
    r = as_json(compare(smollm2_path, smollm2_path, prompts, "--json"))
    a, b = r["models"]
    assert r["text"]["chunks"] == CHUNKS and r["text"]["shared_vocab"] is True
    scored = CHUNKS * (CTX - CTX // 2 - 1)
    assert a["perplexity"]["tokens"] == b["perplexity"]["tokens"] == scored
    assert a["perplexity"]["ppl"] == b["perplexity"]["ppl"]
    assert 1 < a["perplexity"]["ppl"] < 1000 and a["perplexity"]["ppl_error"] > 0
    d = r["divergence"]
    assert d["tokens"] == scored
    assert abs(d["kld_mean"]) < 1e-6 and d["kld_max"] < 1e-6
    assert d["same_top_pct"] == 100.0
    assert [o["prompt"] for o in r["outputs"]] == PROMPTS
    for o in r["outputs"]:
        assert o["a"] == o["b"] and o["a"].strip() and o["diff"] == ""
    for m in r["models"]:
        assert m["file_bytes"] == smollm2_path.stat().st_size
        assert m["planned_bytes"] > m["file_bytes"] // 2
        assert m["perplexity"]["tokens_per_s"] > 0 and m["generation"]["tokens_per_s"] > 0
        assert 0 < m["generation"]["tokens"] <= 8 * len(PROMPTS)
        assert m["vocab_digest"] == a["vocab_digest"]
    assert a["perplexity"]["ppl"] == pytest.approx(reference_ppl(smollm2_path), rel=0.005)


def test_q4_k_m_holds_q4_k_tensors_and_generates(quantized: dict[str, Path]) -> None:
    header = gguf.read(quantized["Q4_K_M"])
    assert header.metadata["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    types = {t.name: t.type for t in header.tensors}
    # rows of 576 are no multiple of QK_K (256): llama.cpp falls back for those (Q5_0, Q8_0);
    # ffn_down's 1536-wide rows keep Q4_K_M's K-quants, Q4_K (type 12) and Q6_K (type 14)
    k_quants = {n for n, t in types.items() if t in (12, 14)}
    assert k_quants == {f"blk.{i}.ffn_down.weight" for i in range(30)}
    assert sum(t == 12 for t in types.values()) >= 10
    q8 = gguf.read(quantized["Q8_0"]).tensors
    assert {t.type for t in q8 if len(t.dims) == 2} == {8}  # GGML_TYPE_Q8_0
    assert {t.type for t in q8 if len(t.dims) == 1} == {0}  # norms stay F32
    llm = Llama(str(quantized["Q4_K_M"]), n_ctx=64, verbose=False)
    out = llm.create_completion(PROMPTS[0], max_tokens=8, temperature=0)
    assert out["usage"]["completion_tokens"] > 0 and out["choices"][0]["text"].strip()


def test_compare_two_quantizations(quantized: dict[str, Path], prompts: Path) -> None:
    a, b = quantized["Q8_0"], quantized["Q4_K_M"]
    done = compare(a, b, prompts)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    out = done.stdout
    assert f"{CHUNKS} chunks of {CTX}" in out
    kld = float(out.split("KL divergence of B from A: mean ")[1].split()[0])
    same = float(out.split("same top token: ")[1].split()[0])
    assert kld > 0 and same < 100
    ppl = [float(x) for x in out.split("perplexity")[1].split("\n")[0].split()[::3]]
    assert len(ppl) == 2 and ppl[0] != ppl[1]
    assert ppl[1] == pytest.approx(reference_ppl(b), rel=0.005)
    verdicts = re.findall(r"^prompt (\d+): .*?(: same output)?$", out, re.MULTILINE)
    assert [int(n) for n, _ in verdicts] == list(range(1, len(PROMPTS) + 1))
    diffs = sum(1 for _, same in verdicts if not same)
    assert out.count(f"\n+++ {b}\n") == diffs  # a unified diff for each that differs


def test_embedding_model_refused(minilm_dir: Path, smollm2_path: Path, tmp_path: Path) -> None:
    bert = tmp_path / "minilm.gguf"
    converted = xllm("convert", str(minilm_dir), str(bert))
    assert converted.returncode == 0, converted.stderr
    done = xllm("compare", str(smollm2_path), str(bert))
    assert done.returncode == 1 and done.stdout == ""
    assert "embedding model (bert, not causal)" in done.stderr
    assert "Traceback" not in done.stderr


def test_text_too_short(smollm2_path: Path, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("It is a truth universally acknowledged. " * 5)
    done = xllm("compare", str(smollm2_path), str(smollm2_path), "--text", str(short))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "needs at least 1024" in done.stderr and "--ctx" in done.stderr


def test_bad_arguments(smollm2_path: Path) -> None:
    done = xllm("compare", str(smollm2_path), "no-such-model:1b")
    assert done.returncode == 1 and "not found" in done.stderr
    done = xllm("compare", str(smollm2_path), str(smollm2_path), "--ctx", "7")
    assert done.returncode == 2 and "--ctx" in done.stderr
