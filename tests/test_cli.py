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
    for flag in (
        "--host",
        "--port",
        "--model",
        "--ctx-size",
        "--threads",
        "--parallel",
        "--cache-ram-fraction",
    ):
        assert flag in r.stdout


def test_convert_and_compare_help_show_their_usage() -> None:
    for command, usage, flags in (
        ("convert", "usage: xllm convert", ["--outtype", "--quantize", "IN OUT"]),
        ("compare", "usage: xllm compare", ["--text", "--ctx", "--chunks", "--prompts",
                                            "--max-tokens", "--threads", "--json"]),
    ):  # fmt: skip
        r = run(command, "--help")
        assert r.returncode == 0 and r.stderr == ""
        assert r.stdout.startswith(usage)
        for flag in flags:
            assert flag in r.stdout, (command, flag)


def test_serve_checks_the_response_cache_share() -> None:
    r = run("serve", "--cache-ram-fraction", "2")
    assert r.returncode == 2
    assert "--cache-ram-fraction: must be from 0 to 1" in r.stderr


def test_serve_missing_file() -> None:
    r = run("serve", "--model", "./does-not-exist.gguf")
    assert r.returncode == 1
    assert "not found" in r.stderr


def test_plan_prints_the_memory_plan() -> None:
    import json

    r = run("plan", "smollm2:135m", "--ctx-size", "1024", "--parallel", "4", "--json")
    assert r.returncode == 0, r.stderr
    plan = json.loads(r.stdout)
    assert plan["architecture"] == "llama" and plan["layers"] == 30
    assert (
        plan["total_bytes"]
        == plan["weights_bytes"] + plan["kv_cache_bytes"] + plan["compute_bytes"]
    )
    assert plan["gpu_layers"] == 0 and plan["gpus"] == [] and plan["fits"] is True
    assert set(plan["max_context_per_sequence"]) == {"f16", "q8_0", "q4_0"}
    text = run("plan", "smollm2:135m")
    assert "KV cache" in text.stdout and "CPU only" in text.stdout
    missing = run("plan", "nope:1b")
    assert missing.returncode == 1 and "not found" in missing.stderr
