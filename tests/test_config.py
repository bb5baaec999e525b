"""Configuration precedence: flag > env > config.yaml > default, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xllm.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("XLLM_HOST", "XLLM_PORT", "XLLM_PARALLEL", "XLLM_CTX_SIZE", "XLLM_PRELOAD"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XLLM_HOME", str(tmp_path))
    cfg = tmp_path / "config.yaml"
    monkeypatch.setenv("XLLM_CONFIG", str(cfg))
    return cfg


@pytest.mark.parametrize(
    ("yaml_text", "env", "flags", "want"),
    [
        ("", {}, {}, {"port": 32769, "host": "127.0.0.1", "parallel": 16}),
        ("server:\n  port: 4000\n", {}, {}, {"port": 4000}),
        ("server:\n  port: 4000\n", {"XLLM_PORT": "5000"}, {}, {"port": 5000}),
        ("server:\n  port: 4000\n", {"XLLM_PORT": "5000"}, {"port": 6000}, {"port": 6000}),
        ("", {"XLLM_HOST": "0.0.0.0:9999"}, {}, {"host": "0.0.0.0", "port": 9999}),
        ("", {"XLLM_HOST": "http://[::1]:7000"}, {}, {"host": "::1", "port": 7000}),
        ("", {"XLLM_HOST": "example.lan"}, {}, {"host": "example.lan", "port": 32769}),
        ("inference:\n  parallel: 4\n", {"XLLM_PARALLEL": ""}, {}, {"parallel": 4}),
        ("models:\n  preload: [a, b]\n", {}, {}, {"preload": ("a", "b")}),
        ("", {"XLLM_PRELOAD": "a, b"}, {}, {"preload": ("a", "b")}),
        (
            "inference:\n  idle_timeout: 300\n  request_timeout: 60\n",
            {},
            {},
            {"idle_timeout": 300.0},
        ),
    ],
)
def test_precedence(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    yaml_text: str,
    env: dict[str, str],
    flags: dict[str, object],
    want: dict[str, object],
) -> None:
    clean_env.write_text(yaml_text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings(flags)
    for k, v in want.items():
        assert getattr(s, k) == v


@pytest.mark.parametrize(
    ("yaml_text", "env", "message"),
    [
        ("server:\n  prot: 1\n", {}, "unknown key 'server.prot'"),
        ("server:\n  port: many\n", {}, "server.port: expected an integer"),
        ("inference:\n  parallel: 0\n", {}, "inference.parallel: must be at least 1"),
        ("- a\n", {}, "expected a mapping"),
        ("server: [\n", {}, "not valid YAML"),
        ("", {"XLLM_PORT": "x"}, "XLLM_PORT: expected an integer"),
    ],
)
def test_errors(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    yaml_text: str,
    env: dict[str, str],
    message: str,
) -> None:
    clean_env.write_text(yaml_text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        load_settings()
