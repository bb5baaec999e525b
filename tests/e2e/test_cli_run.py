"""`xllm run` as a user runs it: one-shot, piped, and the REPL in a real pseudo-terminal."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pexpect

from tests.conftest import Server, free_port

MODEL = "smollm2:135m"


def _env(server_port: int, home: Path) -> dict[str, str]:
    return {**os.environ, "XLLM_HOST": f"127.0.0.1:{server_port}", "XLLM_HOME": str(home)}


def test_one_shot_and_piped(server: Server, tmp_path: Path) -> None:
    env = _env(server.port, tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "xllm", "run", MODEL, "Say", "hello."],
        capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    r = subprocess.run(
        [sys.executable, "-m", "xllm", "run", MODEL],
        input="What is the capital of France?", capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()


def test_repl(server: Server, tmp_path: Path) -> None:
    child = pexpect.spawn(
        sys.executable, ["-m", "xllm", "run", MODEL], env=_env(server.port, tmp_path),
        encoding="utf-8", timeout=60,
    )  # fmt: skip
    child.expect_exact(">>> ")
    child.sendline("/set parameter temperature 0")
    child.expect_exact("Set parameter 'temperature' to '0'")
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect("Paris")
    child.expect_exact(">>> ")
    child.sendline('"""Write the word')
    child.expect_exact("... ")
    child.sendline('blue."""')
    child.expect_exact(">>> ")
    child.sendline("/show info")
    child.expect("llama")
    child.expect_exact(">>> ")
    child.sendline("/image /tmp/none.png")
    child.expect("does not support images")
    child.expect_exact(">>> ")
    child.sendline("/clear")
    child.expect_exact("Cleared session context")
    child.sendline("/bye")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "history").exists()


def test_needs_a_server(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "xllm", "run", MODEL, "hi"],
        capture_output=True, text=True, env=_env(free_port(), tmp_path), timeout=60,
    )  # fmt: skip
    assert r.returncode == 1 and "xllm serve" in r.stderr
