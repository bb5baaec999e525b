"""GGUFs split into several files, and LoRA adapters, on a real `xllm serve`.

The shards are SmolLM2 rewritten by llama.cpp's own GGUF writer as `gguf-split` does; the
adapters are random LoRA weights for its attention projections. What a model answers is checked
against the same file unsplit, and an adapted model against llama.cpp itself
(llama-cpp-python's `Llama(lora_path=...)` in this process), token for token, greedy.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import ollama
import pytest

from tests import gguf_make
from tests.conftest import Server, start_server, stop_server
from tests.upstream import Upstream, sha

PROMPT = "The capital of France is"
GREEDY = {"temperature": 0, "num_predict": 16, "repeat_penalty": 1.0}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("split")
    whole = d / "whole.gguf"
    whole.write_bytes(smollm2_path.read_bytes())
    shards = gguf_make.split(smollm2_path, d / "shards", 3)
    renamed = []
    for i, p in enumerate(shards, 1):
        renamed.append(p.rename(p.with_name(f"smol-Q4_K_M-{i:05d}-of-00003.gguf")))
    adapters = d / "adapters"
    adapters.mkdir()
    return {
        "dir": d,
        "whole": whole,
        "shards": renamed,
        "lora": gguf_make.lora(smollm2_path, adapters / "lora.gguf", strength=0.2),
        "zero": gguf_make.lora(smollm2_path, adapters / "zero.gguf", strength=0.0),
        "f64": gguf_make.lora(smollm2_path, adapters / "f64.gguf", dtype=np.float64),
    }


@pytest.fixture(scope="module")
def upstream(files: dict[str, Any]) -> Iterator[Upstream]:
    u = Upstream()
    shards = {p.name: p.read_bytes() for p in files["shards"]}
    u.add_hf_repo("org/Smol-GGUF", shards)
    broken = dict(shards)
    del broken["smol-Q4_K_M-00002-of-00003.gguf"]
    u.add_hf_repo("org/Broken-GGUF", broken)
    u.start()
    yield u
    u.stop()


@pytest.fixture(scope="module")
def srv(
    tmp_path_factory: pytest.TempPathFactory, files: dict[str, Any], upstream: Upstream
) -> Iterator[Server]:
    args = ["--ctx-size", "512", "--parallel", "2"]
    args += ["--model", str(files["whole"]), "--model", str(files["shards"][0])]
    env = {"HF_ENDPOINT": upstream.url, "XLLM_REGISTRY": upstream.url}
    s = start_server(tmp_path_factory.mktemp("serve-split"), args, env, wait_model=False)
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(srv: Server) -> ollama.Client:
    return ollama.Client(host=srv.url)


def generate(srv: Server, model: str) -> str:
    body = {"model": model, "prompt": PROMPT, "raw": True, "stream": False, "options": GREEDY}
    r = httpx.post(f"{srv.url}/api/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["response"])


def reference(model: Path, adapter: Path) -> str:
    """What llama.cpp itself generates with that adapter (flash attention on, as on a CPU
    context xllm creates with llama.cpp's defaults)."""
    from llama_cpp import Llama

    llm = Llama(
        model_path=str(model), lora_path=str(adapter), n_ctx=512, flash_attn=True,
        n_threads=2, verbose=False,
    )  # fmt: skip
    try:
        out = llm.create_completion(PROMPT, max_tokens=16, temperature=0, repeat_penalty=1.0)
        return str(out["choices"][0]["text"])  # type: ignore[index]
    finally:
        llm.close()


def xllm(srv: Server, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{srv.port}", "XLLM_HOME": str(srv.home)}
    return subprocess.run(
        [sys.executable, "-m", "xllm", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def create(srv: Server, name: str, modelfile: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    (cwd / f"{name}.Modelfile").write_text(modelfile)
    return xllm(srv, "create", name, "-f", f"{name}.Modelfile", cwd=cwd)


def tag(client: ollama.Client, name: str) -> Any:
    return next(m for m in client.list().models if m.model == name)


# --- split GGUFs ----------------------------------------------------------------------------


def test_a_split_file_on_the_command_line_serves_like_the_whole(
    srv: Server, client: ollama.Client, files: dict[str, Any]
) -> None:
    whole = generate(srv, "whole")
    assert "Paris" in whole
    assert generate(srv, "smol-Q4_K_M") == whole
    assert tag(client, "smol-Q4_K_M:latest").size == sum(p.stat().st_size for p in files["shards"])
    split_info = client.show("smol-Q4_K_M").modelinfo or {}
    whole_info = client.show("whole").modelinfo or {}
    assert split_info["general.parameter_count"] == whole_info["general.parameter_count"] > 1e8


def test_pull_a_split_gguf_from_the_hub(
    srv: Server, client: ollama.Client, files: dict[str, Any], upstream: Upstream
) -> None:
    records = list(client.pull("hf.co/org/Smol-GGUF", stream=True))
    assert records[-1].status == "success"
    pulled = {r.digest for r in records if r.digest}
    assert pulled == {sha(p.read_bytes()) for p in files["shards"]}  # every shard, verified
    for p in files["shards"]:
        assert upstream.served[sha(p.read_bytes())] == p.stat().st_size  # each byte once
    name = "hf.co/org/Smol-GGUF:latest"
    assert tag(client, name).size > sum(p.stat().st_size for p in files["shards"])
    assert generate(srv, name) == generate(srv, "whole")
    info = client.show(name).modelinfo or {}
    assert (
        info["general.parameter_count"]
        == (client.show("whole").modelinfo or {})["general.parameter_count"]
    )


def test_a_split_gguf_missing_or_damaged_shard_never_shows(
    srv: Server, client: ollama.Client, files: dict[str, Any], upstream: Upstream
) -> None:
    with pytest.raises(ollama.ResponseError) as e:
        client.pull("hf.co/org/Broken-GGUF")
    assert "lacks smol-Q4_K_M-00002-of-00003.gguf" in str(e.value)
    upstream.flip.add(sha(files["shards"][2].read_bytes()))
    try:
        client.delete("hf.co/org/Smol-GGUF")
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("hf.co/org/Smol-GGUF")
        assert "digest mismatch" in str(e.value)
    finally:
        upstream.flip.clear()
    listed = [m.model for m in client.list().models]
    assert "hf.co/org/Smol-GGUF:latest" not in listed
    assert "hf.co/org/Broken-GGUF:latest" not in listed


def test_create_from_split_files(srv: Server, files: dict[str, Any]) -> None:
    d = files["shards"][0].parent
    r = create(srv, "fromsplit", f"FROM ./{files['shards'][0].name}\n", d)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("copying file") >= 3  # each shard uploaded
    assert generate(srv, "fromsplit") == generate(srv, "whole")
    r = create(srv, "fromsecond", f"FROM ./{files['shards'][1].name}\n", d)
    assert r.returncode == 1
    assert "is part of a model split into 3 files: name its first file" in r.stderr


def test_create_with_a_shard_missing_is_refused(
    srv: Server, tiny_path: Path, tmp_path: Path
) -> None:
    digests = {}
    for p in gguf_make.split(tiny_path, tmp_path, 3)[:2]:
        data = p.read_bytes()
        assert httpx.post(f"{srv.url}/api/blobs/{sha(data)}", content=data).status_code == 201
        digests[p.name] = sha(data)
    r = httpx.post(f"{srv.url}/api/create", json={"model": "partial", "files": digests})
    assert r.status_code == 400
    assert "split into 3 files, but 2 were given" in r.json()["error"]
    for d in digests.values():  # an upload no model uses is not kept
        assert httpx.head(f"{srv.url}/api/blobs/{d}").status_code == 404


def test_a_split_draft_model_drafts_beside_the_model(
    srv: Server, files: dict[str, Any], tmp_path: Path
) -> None:
    # a stored split model as the draft: its blobs have no shard names that llama.cpp could
    # find the others by, so every file must be given (issue 17)
    d = files["shards"][0].parent
    r = create(srv, "splitdraft", f"FROM ./{files['shards'][0].name}\n", d)
    assert r.returncode == 0, r.stderr
    modelfile = f"FROM {files['whole']}\nPARAMETER draft_model splitdraft\n"
    r = create(srv, "drafted", modelfile, tmp_path)
    assert r.returncode == 0, r.stderr
    body = {
        "model": "drafted", "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
        "repeat_penalty": 1.0,
        "speculative": {"type": "draft", "max_draft": 4, "adaptive": False},
    }  # fmt: skip
    out = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300)
    assert out.status_code == 200, out.text
    assert out.json()["choices"][0]["text"] == generate(srv, "whole")
    assert out.json()["usage"]["completion_tokens_details"]["accepted_prediction_tokens"] > 0
    ps = httpx.get(f"{srv.url}/api/ps").json()["models"]
    entry = next(m for m in ps if m["name"] == "drafted:latest")
    draft = entry["draft"]
    assert draft["name"] == "splitdraft:latest" and draft["size"] > 50 * 2**20, draft
    # the memory plan counts every shard of the draft beside the model
    assert entry["size"] > files["whole"].stat().st_size + sum(
        p.stat().st_size for p in files["shards"]
    )


# --- LoRA adapters --------------------------------------------------------------------------


def test_an_adapter_changes_the_model_as_llama_cpp_applies_it(
    srv: Server, files: dict[str, Any], smollm2_path: Path
) -> None:
    d = files["lora"].parent
    assert create(srv, "tuned", "FROM whole\nADAPTER ./lora.gguf\n", d).returncode == 0
    tuned, base = generate(srv, "tuned"), generate(srv, "whole")
    assert tuned != base
    assert tuned == reference(smollm2_path, files["lora"])
    assert create(srv, "untouched", "FROM whole\nADAPTER ./zero.gguf\n", d).returncode == 0
    assert generate(srv, "untouched") == base
    shown = xllm(srv, "show", "tuned", "--modelfile", cwd=d).stdout
    assert "\nADAPTER " in shown and "sha256-" in shown


def test_an_adapter_over_a_split_model(
    srv: Server, client: ollama.Client, files: dict[str, Any], smollm2_path: Path
) -> None:
    client.pull("hf.co/org/Smol-GGUF")
    d = files["lora"].parent
    r = create(srv, "tunedsplit", "FROM hf.co/org/Smol-GGUF\nADAPTER ./lora.gguf\n", d)
    assert r.returncode == 0, r.stderr
    assert generate(srv, "tunedsplit") == reference(smollm2_path, files["lora"])


def test_export_and_import_keep_shards_and_adapters(
    srv: Server, client: ollama.Client, files: dict[str, Any], tmp_path: Path
) -> None:
    client.pull("hf.co/org/Smol-GGUF")
    d = files["lora"].parent
    assert create(srv, "trip", "FROM hf.co/org/Smol-GGUF\nADAPTER ./lora.gguf\n", d).returncode == 0
    before = generate(srv, "trip")
    archive = tmp_path / "trip.tar"
    assert xllm(srv, "export", "trip", str(archive), cwd=tmp_path).returncode == 0
    assert xllm(srv, "rm", "trip", "--force", cwd=tmp_path).returncode == 0
    r = xllm(srv, "import", str(archive), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert generate(srv, "trip") == before


@pytest.mark.parametrize(
    ("adapter", "message"),
    [
        ("f64", "has type 28, not a float type"),
        ("tiny", "do not fit it (an adapter for another model?)"),
        ("model", "is not a LoRA adapter"),
    ],
)
def test_bad_adapters_are_refused_and_not_kept(
    srv: Server, files: dict[str, Any], tiny_path: Path, tmp_path: Path, adapter: str, message: str
) -> None:
    path = {
        "f64": files["f64"],
        "tiny": gguf_make.lora(tiny_path, tmp_path / "tiny-lora.gguf"),
        "model": tiny_path,
    }[adapter]
    data = path.read_bytes()
    assert httpx.post(f"{srv.url}/api/blobs/{sha(data)}", content=data).status_code in (200, 201)
    body = {"model": "bad", "from": "whole", "adapters": {path.name: sha(data)}}
    r = httpx.post(f"{srv.url}/api/create", json=body)
    assert r.status_code == 400 and message in r.json()["error"], r.text
    assert path.name in r.json()["error"]
    if adapter != "model":  # the tiny model's own blob may be another model's
        assert httpx.head(f"{srv.url}/api/blobs/{sha(data)}").status_code == 404
    assert httpx.get(f"{srv.url}/v0/health").json()["status"] == "ok"
    assert "Paris" in generate(srv, "whole")


def test_plan_counts_every_shard(srv: Server, client: ollama.Client, files: dict[str, Any]) -> None:
    client.pull("hf.co/org/Smol-GGUF")

    def weights(model: str) -> int:
        r = xllm(srv, "plan", model, "--json", cwd=files["dir"])
        assert r.returncode == 0, r.stderr
        return int(json.loads(r.stdout)["weights_bytes"])

    whole = weights(str(files["whole"]))
    assert weights(str(files["shards"][0])) == whole
    assert weights("hf.co/org/Smol-GGUF") == whole  # a stored model
    r = xllm(srv, "plan", str(files["shards"][1]), cwd=files["dir"])
    assert r.returncode == 1 and "name its first file" in r.stderr
