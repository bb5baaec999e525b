"""Configuration precedence: flag > env > config.yaml > default, and clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from xllm.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for var in ("XLLM_HOST", "XLLM_PORT", "XLLM_PARALLEL", "XLLM_CTX_SIZE", "XLLM_PRELOAD",
                "XLLM_KEEP_ALIVE", "XLLM_IDLE_TIMEOUT", "OLLAMA_KEEP_ALIVE"):  # fmt: skip
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
        ("", {}, {}, {"log_max_files": 10, "log_max_size": 100 * 10**6}),
        ("", {}, {}, {"replicas": (), "memory_high_watermark": 0.9}),
        ("", {}, {}, {"speculative": "none", "speculative_models": ()}),
        ("inference:\n  speculative: ngram\n", {}, {}, {"speculative": "ngram"}),
        ("", {"XLLM_SPECULATIVE": "ngram"}, {"speculative": "none"}, {"speculative": "none"}),
        (
            "models:\n  speculative:\n    qwen: ngram\n",
            {},
            {},
            {"speculative_models": (("qwen", "ngram"),)},
        ),
        ("", {"XLLM_SPECULATIVE_MODELS": "a=ngram"}, {}, {"speculative_models": (("a", "ngram"),)}),
        ("", {}, {}, {"draft_model": None, "draft_models": ()}),
        ("inference:\n  speculative: auto\n", {}, {}, {"speculative": "auto"}),
        (
            "inference:\n  draft_model: small\nmodels:\n  draft_model:\n    big: tiny.gguf\n",
            {},
            {},
            {"draft_model": "small", "draft_models": (("big", "tiny.gguf"),)},
        ),
        ("", {"XLLM_DRAFT_MODEL": "a"}, {"draft_model": "b"}, {"draft_model": "b"}),
        ("", {"XLLM_DRAFT_MODELS": "a=b,c=d"}, {}, {"draft_models": (("a", "b"), ("c", "d"))}),
        ("", {}, {}, {"header_timeout": 10.0}),
        ("server:\n  header_timeout: 30s\n", {}, {}, {"header_timeout": 30.0}),
        (
            "server:\n  header_timeout: 30\n",
            {"XLLM_HEADER_TIMEOUT": "2.5"},
            {},
            {"header_timeout": 2.5},
        ),
        ("models:\n  replicas:\n    a: 2\n", {}, {}, {"replicas": (("a", 2),)}),
        ("", {"XLLM_REPLICAS": "a=2,b:q8=3"}, {}, {"replicas": (("a", 2), ("b:q8", 3))}),
        ("memory:\n  high_watermark: 0.8\n", {}, {}, {"memory_high_watermark": 0.8}),
        ("", {}, {}, {"shutdown_timeout": 30.0}),
        ("server:\n  shutdown_timeout: 1m\n", {}, {}, {"shutdown_timeout": 60.0}),
        (
            "server:\n  shutdown_timeout: 10\n",
            {"XLLM_SHUTDOWN_TIMEOUT": "5s"},
            {},
            {"shutdown_timeout": 5.0},
        ),
        ("", {"XLLM_SHUTDOWN_TIMEOUT": "5"}, {"shutdown_timeout": 2.5}, {"shutdown_timeout": 2.5}),
        ("", {"XLLM_MEMORY_HIGH_WATERMARK": "95%"}, {}, {"memory_high_watermark": 0.95}),
        (
            "server:\n  log_rotation:\n    max_size: 100MB\n    max_files: 3\n",
            {"XLLM_LOG_MAX_SIZE": "1MiB"},
            {},
            {"log_max_files": 3, "log_max_size": 2**20},
        ),
        ("gpu:\n  layers: 10\n", {}, {}, {"gpu_layers": 10}),
        ("gpu:\n  layers: 10\n", {"XLLM_GPU_LAYERS": "0"}, {}, {"gpu_layers": 0}),
        ("inference:\n  idle_timeout: 300\n", {}, {}, {"keep_alive": 300.0}),
        ("inference:\n  keep_alive: 10m\n", {}, {}, {"keep_alive": 600.0}),
        (  # the seed's spelling is an alias: the new one wins where both are given
            "inference:\n  keep_alive: 10\n  idle_timeout: 20\n",
            {},
            {},
            {"keep_alive": 10.0},
        ),
        ("inference:\n  idle_timeout: 20\n", {"XLLM_IDLE_TIMEOUT": "30"}, {}, {"keep_alive": 30.0}),
        ("", {"XLLM_KEEP_ALIVE": "1m", "XLLM_IDLE_TIMEOUT": "30"}, {}, {"keep_alive": 60.0}),
        ("", {"XLLM_KEEP_ALIVE": "-1"}, {"keep_alive": 5.0}, {"keep_alive": 5.0}),
        ("", {}, {}, {"images_ttl_hours": 1.0, "images_public_url": None,
                      "images_max_pixels": 2048 * 2048}),
        (
            "images:\n  directory: /srv/img\n  ttl_hours: 24\n  max_pixels: 1000000\n",
            {"XLLM_IMAGES_TTL_HOURS": "0.5", "XLLM_IMAGES_PUBLIC_URL": "https://img.lan/x/"},
            {},
            {"images_dir": Path("/srv/img"), "images_ttl_hours": 0.5,
             "images_public_url": "https://img.lan/x", "images_max_pixels": 10**6},
        ),
        ("", {"XLLM_IMAGES_DIR": "~/pics"}, {}, {"images_dir": Path("~/pics").expanduser()}),
        ("", {}, {}, {"max_tokens": 0}),
        ("inference:\n  max_tokens: 256\n", {"XLLM_MAX_TOKENS": "64"}, {}, {"max_tokens": 64}),
        ("inference:\n  max_tokens: 256\n", {}, {"max_tokens": 32}, {"max_tokens": 32}),
    ],
)  # fmt: skip
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
        ("inference:\n  request_timeout: 60\n", {}, "unknown key 'inference.request_timeout'"),
        ("server:\n  gzip: true\n", {}, "unknown key 'server.gzip'"),
        ("gpu:\n  devices: [0]\n", {}, "unknown key 'gpu.devices'"),
        ("server:\n  port: many\n", {}, "server.port: expected an integer"),
        ("inference:\n  parallel: 0\n", {}, "inference.parallel: must be at least 1"),
        ("- a\n", {}, "expected a mapping"),
        ("server: [\n", {}, "not valid YAML"),
        ("server:\n  log_rotation:\n    max_files: 0\n", {}, "max_files: must be at least 1"),
        ("models:\n  replicas:\n    a: 0\n", {}, "models.replicas.a: must be at least 1"),
        ("models:\n  replicas: 2\n", {}, "models.replicas: expected a mapping"),
        ("inference:\n  speculative: eagle\n", {}, "inference.speculative: expected one of"),
        ("models:\n  draft_model: [a]\n", {}, "models.draft_model: expected a mapping"),
        ("", {"XLLM_SPECULATIVE": "yes"}, "XLLM_SPECULATIVE: expected one of none, ngram"),
        ("models:\n  speculative:\n    a: eagle\n", {}, "models.speculative.a: expected one"),
        ("memory:\n  high_watermark: 1.5\n", {}, "high_watermark: must be above 0"),
        ("", {"XLLM_MEMORY_HIGH_WATERMARK": "lots"}, "expected a fraction"),
        ("server:\n  log_rotation:\n    keep: 2\n", {}, "unknown key 'server.log_rotation.keep'"),
        ("", {"XLLM_PORT": "x"}, "XLLM_PORT: expected an integer"),
        ("", {"XLLM_HEADER_TIMEOUT": "0"}, "XLLM_HEADER_TIMEOUT: must be above 0 seconds"),
        ("server:\n  header_timeout: soon\n", {}, "server.header_timeout: expected seconds"),
        ("", {"XLLM_SHUTDOWN_TIMEOUT": "-1"}, "XLLM_SHUTDOWN_TIMEOUT: must not be negative"),
        ("server:\n  shutdown_timeout: soon\n", {}, "server.shutdown_timeout: expected seconds"),
        ("inference:\n  idle_timeout: soon\n", {}, "inference.idle_timeout: expected seconds"),
        ("", {"XLLM_IDLE_TIMEOUT": "soon"}, "XLLM_IDLE_TIMEOUT: expected seconds"),
        ("images:\n  ttl_hours: 0\n", {}, "images.ttl_hours: must be a number above 0"),
        ("", {"XLLM_IMAGES_TTL_HOURS": "inf"}, "XLLM_IMAGES_TTL_HOURS: must be a number above"),
        ("", {"XLLM_IMAGES_PUBLIC_URL": "img.lan"}, "XLLM_IMAGES_PUBLIC_URL: expected an http"),
        ("images:\n  max_pixels: 0\n", {}, "images.max_pixels: must be at least 1"),
        ("images:\n  folder: x\n", {}, "unknown key 'images.folder'"),
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


OLLAMA_VARS = ("OLLAMA_HOST", "OLLAMA_MODELS", "OLLAMA_KEEP_ALIVE", "OLLAMA_NUM_PARALLEL",
               "OLLAMA_MAX_QUEUE", "OLLAMA_ORIGINS", "OLLAMA_CONTEXT_LENGTH", "XLLM_MODELS_DIR",
               "XLLM_IDLE_TIMEOUT", "XLLM_KEEP_ALIVE", "XLLM_ORIGINS", "XLLM_MAX_QUEUE", "XLLM_REGISTRY",
               "HF_ENDPOINT")  # fmt: skip


@pytest.mark.parametrize(
    ("yaml_text", "env", "want"),
    [
        ("", {"OLLAMA_HOST": "0.0.0.0:11434"}, {"host": "0.0.0.0", "port": 11434}),
        ("", {"OLLAMA_HOST": "h", "XLLM_HOST": "x:1"}, {"host": "x", "port": 1}),
        ("", {"OLLAMA_MODELS": "/srv/ollama"}, {"models_dir": Path("/srv/ollama")}),
        ("", {"OLLAMA_MODELS": "/o", "XLLM_MODELS_DIR": "/x"}, {"models_dir": Path("/x")}),
        ("", {"OLLAMA_KEEP_ALIVE": "5m"}, {"keep_alive": 300.0}),
        ("", {"OLLAMA_KEEP_ALIVE": "1h30m"}, {"keep_alive": 5400.0}),
        ("", {"OLLAMA_KEEP_ALIVE": "-1"}, {"keep_alive": -1.0}),
        ("", {"XLLM_IDLE_TIMEOUT": "90s", "OLLAMA_KEEP_ALIVE": "1h"}, {"keep_alive": 90.0}),
        ("", {"XLLM_KEEP_ALIVE": "2m", "OLLAMA_KEEP_ALIVE": "1h"}, {"keep_alive": 120.0}),
        ("", {"OLLAMA_NUM_PARALLEL": "3"}, {"parallel": 3}),
        ("", {"OLLAMA_MAX_QUEUE": "7"}, {"max_queue": 7}),
        ("", {"OLLAMA_ORIGINS": "http://a,http://b"}, {"cors_origins": ("http://a", "http://b")}),
        ("", {"OLLAMA_CONTEXT_LENGTH": "8192"}, {"ctx_size": 8192}),
        ("inference:\n  ctx_size: 2048\n", {"OLLAMA_CONTEXT_LENGTH": "8192"}, {"ctx_size": 8192}),
        ("", {}, {"registry": "https://registry.ollama.ai", "hf_endpoint": "https://huggingface.co"}),
        ("models:\n  registry: http://r.lan:5000/\n", {}, {"registry": "http://r.lan:5000"}),
        ("", {"XLLM_REGISTRY": "https://r.example", "HF_ENDPOINT": "http://127.0.0.1:9/"},
         {"registry": "https://r.example", "hf_endpoint": "http://127.0.0.1:9"}),
        ("", {"XLLM_HOME": "/h"}, {"models_dir": Path("/h/models")}),
    ],
)  # fmt: skip
def test_ollama_variables_and_model_sources(
    clean_env: Path,
    monkeypatch: pytest.MonkeyPatch,
    yaml_text: str,
    env: dict[str, str],
    want: dict[str, object],
) -> None:
    for var in OLLAMA_VARS:
        monkeypatch.delenv(var, raising=False)
    clean_env.write_text(yaml_text)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = load_settings()
    for k, v in want.items():
        assert getattr(s, k) == v


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"OLLAMA_KEEP_ALIVE": "soon"}, "OLLAMA_KEEP_ALIVE: expected seconds or a duration"),
        ({"OLLAMA_NUM_PARALLEL": "0"}, "OLLAMA_NUM_PARALLEL: must be at least 1"),
        ({"OLLAMA_HOST": "h:port"}, "OLLAMA_HOST: expected an integer"),
        ({"XLLM_REGISTRY": "ftp://x"}, "XLLM_REGISTRY: expected an http:// or https:// URL"),
        ({"HF_ENDPOINT": "huggingface.co"}, "HF_ENDPOINT: expected an http"),
    ],
)
def test_ollama_variable_errors(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], message: str
) -> None:
    for var in OLLAMA_VARS:
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=message):
        load_settings()
