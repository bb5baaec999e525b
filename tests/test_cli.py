"""The `xllm` command as a user runs it."""

from __future__ import annotations

import subprocess
import sys

from xllm import __version__


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "xllm", *args], capture_output=True, text=True)


def test_version() -> None:
    r = run("--version")
    assert r.returncode == 0
    assert r.stdout.strip() == f"xllm {__version__}"
    assert __version__ == "0.1.0"


def test_help_lists_commands() -> None:
    r = run("--help")
    assert r.returncode == 0
    assert "serve" in r.stdout


def test_serve_help_names_flags() -> None:
    r = run("serve", "--help")
    assert r.returncode == 0
    for flag in ("--host", "--port", "--model", "--ctx-size", "--threads", "--parallel"):
        assert flag in r.stdout


def test_serve_missing_file() -> None:
    r = run("serve", "--model", "./does-not-exist.gguf")
    assert r.returncode == 1
    assert "not found" in r.stderr
