"""`xllm ps`, `xllm stop` and `xllm list` against a running server, as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Server, free_port, start_server, stop_server

MODEL = "smollm2:135m"


@pytest.fixture(scope="module")
def own(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("cli"), ["--model", MODEL, "--ctx-size", "1024"])
    yield s
    stop_server(s)


def xllm(server_port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{server_port}"}
    return subprocess.run(
        [sys.executable, "-m", "xllm", *args], capture_output=True, text=True, env=env
    )


def test_ps_prints_ollamas_columns(own: Server) -> None:
    r = xllm(own.port, "ps")
    assert r.returncode == 0, r.stderr
    header, row = r.stdout.splitlines()
    assert re.split(r"\s{2,}", header) == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    cells = re.split(r"\s{2,}", row)
    assert cells[0] == MODEL
    assert re.fullmatch(r"[0-9a-f]{12}", cells[1])
    assert re.fullmatch(r"\d+(\.\d)? MB", cells[2])
    assert cells[3:5] == ["100% CPU", "1024"]
    assert re.fullmatch(r"(\d+ minutes|About a minute) from now", cells[5])


def test_list_shows_servable_models(own: Server) -> None:
    r = xllm(own.port, "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert re.split(r"\s{2,}", lines[0]) == ["NAME", "ID", "SIZE", "MODIFIED"]
    assert any(line.startswith(MODEL) for line in lines[1:])

    # `ls` is `list`; the MODIFIED column (relative time) may tick between the two calls.
    def columns(out: str) -> list[list[str]]:
        return [re.split(r"\s{2,}", line)[:3] for line in out.splitlines()]

    assert columns(xllm(own.port, "ls").stdout) == columns(r.stdout)


def test_stop_unloads(own: Server) -> None:
    r = xllm(own.port, "stop", MODEL)
    assert r.returncode == 0, r.stderr
    assert httpx.get(f"{own.url}/api/ps").json()["models"] == []
    assert xllm(own.port, "ps").stdout.strip().splitlines()[1:] == []
    bad = xllm(own.port, "stop", "missing-model")
    assert bad.returncode == 1 and "not found" in bad.stderr


def test_no_server_is_a_clear_error() -> None:
    r = xllm(free_port(), "ps")
    assert r.returncode == 1
    assert "no xllm server is running" in r.stderr and "xllm serve" in r.stderr
