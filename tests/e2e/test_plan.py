"""`POST /v0/plan` and the planner page through a real `xllm serve`: a fake NVML with two GPUs
(tests/fake_nvml first on its PYTHONPATH), the local fake Hub for config.json, validation that
names the field, and the page in headless Chromium (Debian's package, tests/setup.sh)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server, stop_server
from tests.upstream import Upstream

FAKE_NVML = Path(__file__).parent.parent / "fake_nvml"
LLAMA3 = {"num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
          "num_key_value_heads": 8, "vocab_size": 128256, "intermediate_size": 14336,
          "max_position_embeddings": 131072}  # fmt: skip
MANUAL = {"params": 8.03e9, "layers": 32, "hidden_size": 4096, "heads": 32, "kv_heads": 8,
          "vocab": 128256, "context_length": 131072}  # fmt: skip
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def upstream(tiny_path: Path) -> Iterator[Upstream]:
    u = Upstream()
    u.add_model("tiny", tiny_path.read_bytes())
    u.add_hf_repo("org/llama3", {"config.json": json.dumps(LLAMA3).encode()})
    u.add_hf_repo("org/no-config", {"README.md": b"# weights elsewhere\n"})
    u.add_hf_repo("org/gated", {"config.json": json.dumps(LLAMA3).encode()})
    u.hf_gated["org/gated"] = "hf_gate"
    u.start()
    yield u
    u.stop()


def _serve(tmp: Path, upstream: Upstream, extra: dict[str, str] | None = None) -> Server:
    pythonpath = os.pathsep.join([str(FAKE_NVML), os.environ.get("PYTHONPATH", "")])
    env = {"XLLM_REGISTRY": upstream.url, "HF_ENDPOINT": upstream.url, "HF_HOME": str(tmp / "hf"),
           "PYTHONPATH": pythonpath, **(extra or {})}  # fmt: skip
    return start_server(tmp, ["--ctx-size", "512", "--parallel", "1"], env, wait_model=False)


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory, upstream: Upstream) -> Iterator[Server]:
    s = _serve(tmp_path_factory.mktemp("plan"), upstream)
    r = httpx.post(f"{s.url}/api/pull", json={"model": "tiny", "stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    yield s
    stop_server(s)


def plan(srv: Server, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{srv.url}/v0/plan", json=body, timeout=30)


def test_two_gpus_from_nvml_and_a_fitting_plan(srv: Server) -> None:
    r = plan(srv, {**MANUAL, "ctx_size": 32768})
    assert r.status_code == 200, r.text
    p = r.json()
    assert [d["name"] for d in p["devices"]] == ["NVIDIA GeForce RTX 4090", "NVIDIA RTX A4000"]
    assert p["message"] is None and p["fits"] is True and p["gpu_layers"] is None
    assert p["kv_bytes_per_token"] == 2 * 32 * 8 * 128 * 2
    assert p["kv_bytes"] == 32768 * 131072
    assert p["total_bytes"] == p["weights_bytes"] + p["kv_bytes"] + p["activations_bytes"]
    free = (24564 - 2048 + 16376 - 1024) * MiB
    assert p["available_bytes"] == free - 2 * 500_000_000
    assert sum(d["planned_bytes"] for d in p["devices"]) == pytest.approx(p["total_bytes"], abs=2)
    table = {(row["quant"], row["kv_type"]): row["max_context"] for row in p["max_context"]}
    assert set(table) == {
        (q, kv) for q in ("fp16", "int8", "int4") for kv in ("f16", "q8_0", "q4_0")
    }
    assert set(table.values()) == {131072}  # 38 GB: every setting reaches the model's context
    rec = p["recommendation"]
    assert (rec["quant"], rec["kv_type"]) == ("fp16", "f16") and "32768" in rec["reason"]
    assert [s["quant"] for s in p["chart"]["series"]] == ["fp16", "int8", "int4"]


def test_max_context_on_a_what_if_24_gb_gpu(srv: Server) -> None:
    p = plan(srv, {**MANUAL, "vram_mb": [24000]}).json()
    table = {(row["quant"], row["kv_type"]): row["max_context"] for row in p["max_context"]}
    # fp16 weights + f16 KV: (available - weights - activations) / KV per token, exactly
    room = p["available_bytes"] - p["weights_bytes"] - p["activations_bytes"]
    assert table[("fp16", "f16")] == room // p["kv_bytes_per_token"]
    assert table[("fp16", "f16")] < table[("fp16", "q8_0")] < table[("int4", "q4_0")] == 131072


def test_one_gpu_a_what_if_amount_and_layers_that_fit(srv: Server) -> None:
    one = plan(srv, {**MANUAL, "gpus": [1]}).json()
    assert [d["index"] for d in one["devices"]] == [1]
    what_if = plan(srv, {**MANUAL, "vram_mb": [8000], "ctx_size": 8192}).json()
    assert what_if["fits"] is False and 0 < what_if["gpu_layers"] < 32
    assert what_if["recommendation"]["quant"] == "int4"  # fp16 and int8 do not fit 8 GB


@pytest.mark.parametrize(
    ("backend", "quant", "factor"),
    [("transformers", "fp16", 0.15), ("autogptq", "int4", 0.08), ("vllm", "fp16", 0.10)],
)
def test_backends(srv: Server, backend: str, quant: str, factor: float) -> None:
    p = plan(srv, {**MANUAL, "backend": backend, "quant": quant}).json()
    base = p["weights_bytes"] + p["activations_bytes"] + (0 if backend == "vllm" else p["kv_bytes"])
    assert p["overhead_bytes"] == pytest.approx(base * factor, abs=2)
    if backend == "vllm":  # gpu_memory_utilization of each GPU's total, at most its free memory
        total = (24564 + 16376) * MiB
        assert p["available_bytes"] <= total * 0.9 - 2 * 500_000_000 + 1


def test_stored_gguf_model_is_planned_as_llama_cpp_allocates_it(srv: Server) -> None:
    p = plan(srv, {"model": "tiny", "ctx_size": 256}).json()
    assert p["quant"] == "gguf" and p["model"]["name"] == "tiny"
    assert p["max_context"][0]["quant"] == "gguf"


def test_hub_config(srv: Server, upstream: Upstream) -> None:
    r = plan(srv, {"hf": "org/llama3"})
    assert r.status_code == 200, r.text
    m = r.json()["model"]
    assert (m["layers"], m["heads"], m["kv_heads"], m["head_dim"], m["context_length"]) == (
        32, 32, 8, 128, 131072)  # fmt: skip
    hits = sum(upstream.hits.values())
    assert plan(srv, {"hf": "org/llama3"}).status_code == 200
    assert sum(upstream.hits.values()) == hits  # cached: no second download


@pytest.mark.parametrize(
    ("repo", "status", "words"),
    [("org/missing", 404, "not found on the Hub"), ("org/no-config", 404, "no config.json"),
     ("org/gated", 403, "gated")],
)  # fmt: skip
def test_hub_errors(srv: Server, repo: str, status: int, words: str) -> None:
    r = plan(srv, {"hf": repo})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert words in err["message"] and err["param"] == "hf"


def test_gated_repo_with_a_token(tmp_path: Path, upstream: Upstream) -> None:
    s = _serve(tmp_path, upstream, {"HF_TOKEN": "hf_gate"})
    try:
        r = plan(s, {"hf": "org/gated"})
        assert r.status_code == 200, r.text
        assert r.json()["model"]["kv_heads"] == 8
    finally:
        stop_server(s)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**MANUAL, "layers": -1}, "layers"),
        ({**MANUAL, "layers": 0}, "layers"),
        ({**MANUAL, "params": 0}, "params"),
        ({**MANUAL, "params": 1e20}, "params"),
        ({**MANUAL, "heads": 10**9}, "heads"),
        ({**MANUAL, "kv_heads": 64}, "kv_heads"),
        ({**MANUAL, "ctx_size": 0}, "ctx_size"),
        ({**MANUAL, "ctx_size": 10**7}, "ctx_size"),
        ({**MANUAL, "parallel": -3}, "parallel"),
        ({**MANUAL, "safety_margin_mb": -1}, "safety_margin_mb"),
        ({**MANUAL, "gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
        ({**MANUAL, "vram_mb": [0]}, "vram_mb[0]"),
        ({**MANUAL, "vram_mb": [-24000]}, "vram_mb[0]"),
        ({**MANUAL, "gpus": [7]}, "gpus"),
        ({**MANUAL, "quant": "int3"}, "quant"),
        ({**MANUAL, "quant": "gguf"}, "quant"),
        ({**MANUAL, "kv_type": "q2"}, "kv_type"),
        ({**MANUAL, "backend": "ollama"}, "backend"),
        ({**MANUAL, "backend": "autogptq", "quant": "fp16"}, "quant"),
        ({"params": 8e9, "layers": 32, "hidden_size": 4096}, "heads"),
        ({}, "model"),
        ({**MANUAL, "hf": "org/llama3"}, "params"),  # two sources: the second is named
        ({"hf": "not a repo"}, "hf"),
        ({"hf": "0/" + "0" * 197}, "hf"),  # found by schemathesis: huggingface_hub refuses it
        ({"hf": "org/a..b"}, "hf"),
        ({"model": "/etc/passwd"}, "model"),  # paths are never read over HTTP
        ({"model": str(Path(__file__))}, "model"),
        ({**MANUAL, "typo": 1}, "typo"),
    ],
)
def test_validation_names_the_field(srv: Server, body: dict[str, Any], field: str) -> None:
    r = plan(srv, body)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == field, r.text


def test_openapi_root_and_page(srv: Server) -> None:
    doc = httpx.get(f"{srv.url}/openapi.json").json()
    assert "requestBody" in doc["paths"]["/v0/plan"]["post"]
    plain = httpx.get(f"{srv.url}/")
    assert plain.text == "Ollama is running"  # Ollama's clients, as before
    html = httpx.get(f"{srv.url}/", headers={"Accept": "text/html,*/*"})
    assert html.headers["Content-Type"].startswith("text/html") and "/v0/ui/plan" in html.text
    page = httpx.get(f"{srv.url}/v0/ui/plan")
    assert page.status_code == 200 and 'src="plan.js"' in page.text
    assert "http" not in re.sub(
        r"http://www\.w3\.org/2000/svg", "", httpx.get(f"{srv.url}/v0/ui/plan.js").text
    )
    assert httpx.get(f"{srv.url}/v0/ui/nope").status_code == 404


def test_api_key_guards_the_plan_not_the_page(tmp_path: Path, upstream: Upstream) -> None:
    s = _serve(tmp_path, upstream, {"XLLM_API_KEY": "sekret"})
    try:
        assert httpx.get(f"{s.url}/v0/ui/plan").status_code == 200
        assert plan(s, MANUAL).status_code == 401
        ok = httpx.post(f"{s.url}/v0/plan", json=MANUAL, headers={"Authorization": "Bearer sekret"})
        assert ok.status_code == 200
        foreign = httpx.get(f"{s.url}/v0/ui/plan", headers={"Host": "evil.example"})
        assert foreign.status_code == 403
    finally:
        stop_server(s)


def chromium(url: str, *args: str) -> str:
    exe = shutil.which("chromium")
    assert exe, "chromium is missing: tests/setup.sh installs it (apt-get install chromium)"
    r = subprocess.run(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         "--virtual-time-budget=8000", *args, url],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


PAGE_QUERY = ("params=8.03e9&layers=32&hidden_size=4096&heads=32&kv_heads=8&vocab=128256"
              "&context_length=131072&ctx_size=131072&hf=meta-llama/Llama-3.1-8B-Instruct&run=1")  # fmt: skip


def test_page_in_a_browser(srv: Server, tmp_path: Path) -> None:
    url = f"{srv.url}/v0/ui/plan?{PAGE_QUERY}"
    dom = chromium(url, "--dump-dom")
    expected = plan(srv, {**MANUAL, "ctx_size": 131072}).json()
    # the two fake GPUs are listed
    assert "NVIDIA GeForce RTX 4090" in dom and "NVIDIA RTX A4000" in dom
    # the computed max contexts, as the API gives them
    cells = dict(
        ((q, kv), int(v.replace(",", "").rstrip("*")))
        for q, kv, v in re.findall(r'data-quant="(\w+)" data-kv="(\w+)">([\d,*]+)<', dom)
    )
    assert cells == {(r["quant"], r["kv_type"]): r["max_context"] for r in expected["max_context"]}
    rec = re.search(r'id="recommended-context" data-value="(\d+)"', dom)
    assert rec and int(rec.group(1)) == expected["recommendation"]["max_context"]
    # the chart: a trace per quantization, the free-memory line, a point per max context
    assert re.findall(r'<path class="trace" data-quant="(\w+)"', dom) == ["fp16", "int8", "int4"]
    assert dom.count('class="free"') == 1
    assert len(re.findall(r'<circle class="max-point"', dom)) >= 1
    for name, size in (("desktop", "1280,2000"), ("narrow", "420,3000")):
        shot = tmp_path / f"plan-{name}.png"
        chromium(url, f"--window-size={size}", f"--screenshot={shot}")
        assert shot.stat().st_size > 10_000
    print("screenshots:", tmp_path)


def test_page_shows_a_hub_error(srv: Server) -> None:
    dom = chromium(f"{srv.url}/v0/ui/plan?hf=org/missing&run=1", "--dump-dom")
    assert re.search(r'id="error"[^>]*>[^<]*not found on the Hub', dom)
