"""Malformed GGUF files given to `xllm serve --model`: a 400 that names the defect, no runner
started, the server alive and still serving a good model (RELIABILITY items 2-3)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests import gguf_corpus
from tests.conftest import package_file, start_server, stop_server
from xllm.models import names

# one case per kind of defect: header, metadata, vocabulary, tensor info, tensor bounds
CASES = [
    "n_kv_huge",
    "key_size_huge",
    "key_duplicate",
    "token_longer_than_int32_max",
    "scores_declared_int8",
    "alignment_13",
    "tensor_name_duplicate",
    "tensor_ne_overflow",
    "tensor_type_unknown",
    "bleeding_llama_one_byte_past_end",
    "bleeding_llama_offset_2_63",
    "not_enough_data",
]


def _children(pid: int) -> list[str]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return out.split()


def test_malformed_models_are_refused_and_the_server_survives(tmp_path: Path) -> None:
    corpus = gguf_corpus.build(tmp_path / "corpus")
    tiny = tmp_path / "good.gguf"
    shutil.copy(package_file("tinycoder", "models/tiny.gguf"), tiny)
    args = ["--ctx-size", "256", "--parallel", "1"]
    for case in CASES:
        args += ["--model", str(corpus[case][0])]
    s = start_server(tmp_path, [*args, "--model", str(tiny)], wait_model=False)
    try:
        pid = s.proc.pid
        deadline = (
            time.monotonic() + 60
        )  # the preloads: every bad file refused, the good one loaded
        while time.monotonic() < deadline:
            health = httpx.get(f"{s.url}/v0/health").json()
            if [m["name"] for m in health["models"]] == ["good:latest"]:
                break
            time.sleep(0.2)
        assert [m["name"] for m in health["models"]] == ["good:latest"]
        runners = _children(pid)
        assert len(runners) == 1  # the good model's runner, none for the bad files
        for case in CASES:
            path, needle = corpus[case]
            model = names.name_for_path(path)
            body = {"model": model, "prompt": "Hello", "max_tokens": 2}
            r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 400, (case, r.text)
            err = r.json()["error"]
            assert err["type"] == "invalid_request_error"
            assert path.name in err["message"] and needle in err["message"], (case, err)
            r = httpx.post(f"{s.url}/api/generate", json=body | {"stream": False}, timeout=30)
            assert r.status_code == 400 and needle in r.json()["error"], (case, r.text)
            t0 = time.monotonic()
            assert httpx.get(f"{s.url}/api/version", timeout=1).status_code == 200
            assert time.monotonic() - t0 < 1
        assert s.proc.poll() is None and s.proc.pid == pid
        assert _children(pid) == runners  # no runner was ever started for a bad file
        good = {"model": "good", "prompt": "Hello", "max_tokens": 2, "ignore_eos": True}
        r = httpx.post(f"{s.url}/v1/completions", json=good, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        assert "preloading" in s.logs() and "bleeding_llama_offset_2_63" in s.logs()
    finally:
        stop_server(s)


@pytest.mark.parametrize("case", ["tensor_nbytes_overflow", "version_byte_swapped"])
def test_plan_cli_names_the_defect(tmp_path: Path, case: str) -> None:
    path, needle = gguf_corpus.build(tmp_path)[case]
    r = subprocess.run(
        [sys.executable, "-m", "xllm", "plan", str(path)], capture_output=True, text=True
    )
    assert r.returncode == 1 and needle in r.stderr and "Traceback" not in r.stderr


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_corpus_through_create_and_the_models_dir(tmp_path: Path) -> None:
    """Every malformed file, given to `/api/create` (uploaded as a blob), to `xllm create`
    (`FROM ./bad.gguf`) and dropped into the store by hand: a 400 that names the defect, no
    file left behind by the first two, the server alive and no runner ever started."""
    corpus = gguf_corpus.build(tmp_path / "corpus")
    assert len(corpus) >= 30
    s = start_server(tmp_path / "srv", ["--ctx-size", "256", "--parallel", "1"], wait_model=False)
    try:
        pid = s.proc.pid
        store = s.home / "models"
        before = _files(store)
        for i, (case, (path, needle)) in enumerate(sorted(corpus.items())):
            data = path.read_bytes()
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            r = httpx.post(f"{s.url}/api/blobs/{digest}", content=data, timeout=30)
            assert r.status_code in (200, 201), (case, r.text)
            body = {"model": f"api-{i}", "files": {path.name: digest}}
            r = httpx.post(f"{s.url}/api/create", json=body, timeout=30)
            assert r.status_code == 400 and needle in r.json()["error"], (case, r.text)
        assert _files(store) == before, "an upload of a malformed file was kept"

        env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{s.port}"}
        for i, (case, (path, needle)) in enumerate(sorted(corpus.items())):
            (tmp_path / "Modelfile").write_text(f"FROM {path}\n")
            r = subprocess.run(
                [sys.executable, "-m", "xllm", "create", f"cli-{i}", "-f", "Modelfile"],
                capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
            )  # fmt: skip
            assert r.returncode == 1 and needle in r.stderr, (case, r.stderr)
            assert "Traceback" not in r.stderr
        assert _files(store) == before, "`xllm create` of a malformed file left a file"

        for i, (case, (path, needle)) in enumerate(sorted(corpus.items())):
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            (store / "blobs" / f"sha256-{digest}").write_bytes(data)
            config = b"{}"
            (store / "blobs" / f"sha256-{hashlib.sha256(config).hexdigest()}").write_bytes(config)
            manifest = {
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": {
                    "mediaType": "application/vnd.docker.container.image.v1+json",
                    "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
                    "size": len(config),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.ollama.image.model",
                        "digest": f"sha256:{digest}",
                        "size": len(data),
                    }
                ],
            }
            where = store / "manifests" / "registry.ollama.ai" / "library" / f"dropped-{i}"
            where.mkdir(parents=True, exist_ok=True)
            (where / "latest").write_text(json.dumps(manifest))
            body = {"model": f"dropped-{i}", "prompt": "Hello", "stream": False}
            r = httpx.post(f"{s.url}/api/generate", json=body, timeout=30)
            assert r.status_code == 400 and needle in r.json()["error"], (case, r.text)
        assert httpx.get(f"{s.url}/api/tags", timeout=5).status_code == 200
        t0 = time.monotonic()
        assert httpx.get(f"{s.url}/api/version", timeout=1).status_code == 200
        assert time.monotonic() - t0 < 1
        assert s.proc.poll() is None and s.proc.pid == pid
        assert _children(pid) == []  # no runner was started for any of them
    finally:
        stop_server(s)
