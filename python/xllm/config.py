"""Configuration: the only module that reads `XLLM_*` variables and `config.yaml`.

Precedence, implemented once in `load_settings`: command-line flag > environment variable >
config file > default. Every setting has a dotted key (its place in `config.yaml`) and an
`XLLM_*` variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from xllm.engine.protocol import SPECULATIVE

DEFAULT_PORT = 32769
DEFAULT_HOST = "127.0.0.1"


class ConfigError(ValueError):
    """A bad value or unknown key in config.yaml or the environment, named by its key path."""


def _home() -> Path:
    return Path(os.environ.get("XLLM_HOME") or Path.home() / ".xllm").expanduser()


def _positive_int(key: str, value: Any) -> int:
    n = _int(key, value)
    if n < 1:
        raise ConfigError(f"{key}: must be at least 1, got {value!r}")
    return n


def _clamped_int(key: str, value: Any) -> int:
    """An integer, a negative one read as 0."""
    return max(0, _int(key, value))


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None


def _float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None


def _positive_float(key: str, value: Any) -> float:
    x = _float(key, value)
    if not 0 < x < float("inf"):
        raise ConfigError(f"{key}: must be a number above 0, got {value!r}")
    return x


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    return str(value)


def _str_list(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):  # environment variables carry comma-separated lists
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return tuple(value)


def _url(key: str, value: Any) -> str:
    url = _str(key, value).strip().rstrip("/")
    if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", url):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return url


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _bytes(key: str, value: Any) -> int:
    """A size: bytes, or with a unit (`8GB`, `512MiB`)."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in units:
        raise ConfigError(f"{key}: expected a size like 8GB or 512MiB, got {value!r}")
    return int(float(m.group(1)) * units[m.group(2).lower()])


def _share(key: str, value: Any) -> float:
    """A share written `0.9` or `90%`."""
    text = str(value).strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ConfigError(f"{key}: expected a fraction like 0.9 or 90%, got {value!r}") from None


def _fraction(key: str, value: Any) -> float:
    """A share of memory: `0.9` or `90%`."""
    x = _share(key, value)
    if not 0 < x <= 1:
        raise ConfigError(f"{key}: must be above 0 and at most 1 (100%), got {value!r}")
    return x


def ram_share(key: str, value: Any) -> float:
    """A share of memory that may be none: `0.02`, `2%` or `0`."""
    x = _share(key, value)
    if not 0 <= x <= 1:
        raise ConfigError(f"{key}: must be from 0 to 1 (100%), got {value!r}")
    return x


def _replicas(key: str, value: Any) -> tuple[tuple[str, int], ...]:
    """`{model: N}` in config.yaml, `model=2,other=3` in the environment."""
    if isinstance(value, str):
        value = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of model to a number of replicas")
    out = []
    for name, n in value.items():
        count = _positive_int(f"{key}.{name}", n)
        if count > 64:
            raise ConfigError(f"{key}.{name}: at most 64 replicas, got {n!r}")
        out.append((str(name).strip(), count))
    return tuple(out)


def _priorities(key: str, value: Any) -> tuple[tuple[str, str], ...]:
    """`{model: high|normal|low}` in config.yaml, `model=high,other=low` in the environment."""
    if isinstance(value, str):
        value = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of model to high/normal/low")
    for name, level in value.items():
        if level not in ("high", "normal", "low"):
            raise ConfigError(f"{key}.{name}: expected high, normal or low, got {level!r}")
    return tuple((str(k).strip(), str(v)) for k, v in value.items())


def _speculative(key: str, value: Any) -> str:
    text = _str(key, value)
    if text not in SPECULATIVE:
        raise ConfigError(f"{key}: expected one of {', '.join(SPECULATIVE)}, got {value!r}")
    return text


def _per_model(
    key: str, value: Any, what: str, parse: Callable[[str, Any], str]
) -> tuple[tuple[str, str], ...]:
    """`{model: value}` in config.yaml, `model=value,other=value` in the environment."""
    if isinstance(value, str):
        value = dict(p.split("=", 1) for p in value.split(",") if "=" in p)
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping of model to {what}")
    return tuple((str(k).strip(), parse(f"{key}.{k}", v)) for k, v in value.items())


FLAVOURS = ("openai", "vllm", "llama-server", "xllm")
"""Kinds of OpenAI-compatible upstream: what each adds (vLLM's `/health` and `max_model_len`,
llama-server's `/health`, xllm's `/v0/health` and capabilities) is used where offered."""
BALANCES = ("least_outstanding", "round_robin")


@dataclass(frozen=True)
class RemoteEndpoint:
    """An OpenAI-compatible server (vLLM, a Ray Serve or llm-d gateway, llama-server, another
    xllm...), or several replicas of one, whose models xllm serves as its own."""

    name: str
    """What Modelfiles (`FROM remote:NAME/model`), logs and /v0/health call it."""
    base_urls: tuple[str, ...]
    """Each replica's root URL (`http://host:8000`; a trailing `/v1` is dropped)."""
    models: tuple[tuple[str, str], ...] = ()
    """(local name, upstream name): the models served under a name of this server."""
    api_key_env: str | None = None
    """The environment variable holding its API key (sent as `Authorization: Bearer`)."""
    api_key_file: str | None = None
    """Or a file holding it (first line)."""
    timeout: float = 300.0
    """Seconds the upstream may stay silent (before its first byte, or between two)."""
    connect_timeout: float = 5.0
    """Seconds to open a connection to it."""
    flavour: str = "openai"
    """openai, vllm, llama-server or xllm (see FLAVOURS)."""
    balance: str = "least_outstanding"
    """How requests spread over `base_urls`: least_outstanding or round_robin."""
    health_interval: float = 5.0
    """Seconds between health checks of each base URL."""
    verify_tls: bool = True
    """Check the upstream's TLS certificate (https)."""


_REMOTE_KEYS = frozenset(f.name for f in dataclasses.fields(RemoteEndpoint)) | {"base_url"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _base_url(key: str, value: Any) -> str:
    url = _url(key, value)
    if "@" in url.split("/", 3)[2]:
        raise ConfigError(f"{key}: credentials in the URL are refused; use api_key_env")
    return url.removesuffix("/v1")


def _remote(key: str, value: Any) -> RemoteEndpoint:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping (name, base_url, models...)")
    unknown = sorted(set(value) - _REMOTE_KEYS)
    if unknown:
        raise ConfigError(f"{key}: unknown key {unknown[0]!r}")
    name = _str(f"{key}.name", value.get("name", ""))
    if not _NAME.fullmatch(name):
        raise ConfigError(f"{key}.name: expected letters, digits, '.', '_' or '-', got {name!r}")
    urls = value.get("base_urls", value.get("base_url"))
    if urls is None:
        raise ConfigError(f"{key}.base_url: required")
    urls = [urls] if isinstance(urls, str) else urls
    if not isinstance(urls, list) or not urls:
        raise ConfigError(f"{key}.base_url: expected a URL or a list of URLs")
    models = value.get("models") or {}
    if not isinstance(models, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) and v for k, v in models.items()
    ):
        raise ConfigError(f"{key}.models: expected a mapping of local name to upstream name")
    flavour = _str(f"{key}.flavour", value.get("flavour", "openai"))
    if flavour not in FLAVOURS:
        raise ConfigError(f"{key}.flavour: expected one of {', '.join(FLAVOURS)}, got {flavour!r}")
    balance = _str(f"{key}.balance", value.get("balance", "least_outstanding"))
    if balance not in BALANCES:
        raise ConfigError(f"{key}.balance: expected one of {', '.join(BALANCES)}, got {balance!r}")
    defaults = RemoteEndpoint(name, ())
    key_env, key_file = value.get("api_key_env"), value.get("api_key_file")
    timing = {
        k: _timeout(f"{key}.{k}", value[k]) if k in value else getattr(defaults, k)
        for k in ("timeout", "connect_timeout", "health_interval")
    }
    return RemoteEndpoint(
        name=name,
        base_urls=tuple(_base_url(f"{key}.base_url[{i}]", u) for i, u in enumerate(urls)),
        models=tuple(models.items()),
        flavour=flavour,
        balance=balance,
        verify_tls=_bool(f"{key}.verify_tls", value.get("verify_tls", True)),
        api_key_env=_str(f"{key}.api_key_env", key_env) if key_env else None,
        api_key_file=_str(f"{key}.api_key_file", key_file) if key_file else None,
        timeout=timing["timeout"],
        connect_timeout=timing["connect_timeout"],
        health_interval=timing["health_interval"],
    )


def _remotes(key: str, value: Any) -> tuple[RemoteEndpoint, ...]:
    """`engines.remote`: a list of endpoints (YAML or JSON text in the environment)."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: not valid YAML or JSON: {e}") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of remote endpoints")
    out = tuple(_remote(f"{key}[{i}]", v) for i, v in enumerate(value))
    names = [r.name for r in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise ConfigError(f"{key}: two endpoints are named {dup!r}")
    return out


@dataclass(frozen=True)
class Settings:
    """Every setting xllm reads, with its default."""

    host: str = DEFAULT_HOST
    """Address `xllm serve` binds; 127.0.0.1 keeps it local."""
    port: int = DEFAULT_PORT
    """Port of the HTTP server."""
    log_file: str | None = None
    """Also log to this file, rotated daily and when it grows past log_max_size."""
    log_max_files: int = 10
    """Rotated log files kept (older ones are deleted)."""
    log_max_size: int = 100 * 10**6
    """A log file past this size is rotated before the day ends."""
    tls_cert: str | None = None
    """Serve HTTPS with this certificate (PEM); needs tls_key."""
    tls_key: str | None = None
    """Private key (PEM) of tls_cert."""
    models_dir: Path = field(default_factory=lambda: _home() / "models")
    """Where pulled and created models are stored."""
    registry: str = "https://registry.ollama.ai"
    """The Ollama-protocol registry `pull`/`push` use for names without a host."""
    hf_endpoint: str = "https://huggingface.co"
    """The Hugging Face Hub (`HF_ENDPOINT`); its token comes from `HF_TOKEN` or `hf auth login`."""
    preload: tuple[str, ...] = ()
    """Models loaded when the server starts."""
    ctx_size: int = 4096
    """Context length per sequence (capped at the model's training context)."""
    parallel: int = 16
    """Sequences decoded together per model (continuous batching)."""
    max_queue: int = 1000
    """Requests that may wait for a free sequence before new ones get 503."""
    max_tokens: int = 0
    """Tokens one request may generate at most, whatever it asks (llama-server's `-n`); 0: up
    to the end of the context."""
    threads: int = 0
    """CPU threads for llama.cpp; 0 = the number of cores."""
    batch_size: int = 512
    """Tokens per decode step (prompt chunks are cut to fit)."""
    gpu_layers: int = -1
    """Layers offloaded to the GPU; -1 = as many as the build supports and memory allows."""
    keep_alive: float = 300.0
    """Seconds an unused model stays loaded (negative: forever); `idle_timeout` is its alias."""
    memory_budget: int | None = None
    """Bytes all loaded models may use together (default: what the machine has free)."""
    priorities: tuple[tuple[str, str], ...] = ()
    """(model, high|normal|low): lower priorities are unloaded first when memory is needed."""
    replicas: tuple[tuple[str, int], ...] = ()
    """(model, N): load N runners of the model and hand them requests in turn."""
    memory_high_watermark: float = 0.9
    """Above this share of RAM or of a GPU's memory in use, idle models are unloaded."""
    cors_origins: tuple[str, ...] = ("*",)
    """Origins allowed by CORS."""
    api_keys: tuple[str, ...] = ()
    """If set, requests need `Authorization: Bearer <key>`."""
    model_management: bool = True
    """Whether clients may pull, push, create, copy and delete models (and upload blobs)."""
    shutdown_timeout: float = 30.0
    """Seconds a first SIGINT/SIGTERM lets running requests finish before they are cut."""
    log_level: str = "info"
    """Log level: debug, info, warning, error."""
    max_audio_upload: int = 25 * 10**6
    """The largest audio file `/v1/audio/transcriptions` takes (OpenAI's 25 MB); the request
    body limit (50 MB) caps it."""
    header_timeout: float = 10.0
    """Seconds a connection has to send a whole request head, counted from when it opens or its
    previous response ends; idle keep-alive connections are closed after it too."""
    remote_images: bool = False
    """Whether the server fetches images requests name by http(s) URL (public addresses only,
    10 MB and 10 s each); off, only data: URIs and base64 are taken."""
    remote: tuple[RemoteEndpoint, ...] = ()
    """OpenAI-compatible servers whose models this one serves (`engines.remote`)."""
    cache_ram_fraction: float = 0.02
    """Share of total RAM the temperature-0 response cache may hold; 0 turns it off."""
    cache_persist: bool = True
    """Whether finished sequences' KV state is saved on disk, for a later prompt that goes on
    from one (the next turn of a conversation, after an unload or a restart)."""
    cache_dir: Path = field(default_factory=lambda: _home() / "cache")
    """Where the KV state is saved, a folder per model and KV settings."""
    cache_max_bytes: int = 10 * 2**30
    """Disk the saved KV state of each model may take; the least recently used goes first."""
    speculative: str = "none"
    """Speculation for requests that do not choose: ngram, draft, auto or none (SPECULATIVE)."""
    speculative_models: tuple[tuple[str, str], ...] = ()
    """(model, a SPECULATIVE mode): models that speculate otherwise than `speculative` says."""
    draft_model: str | None = None
    """A draft model (name or GGUF file) loaded beside every model for draft-model speculation;
    each must share its vocabulary."""
    draft_models: tuple[tuple[str, str], ...] = ()
    """(model, draft model): models with a draft model of their own."""
    loras_dir: Path = field(default_factory=lambda: _home() / "loras")
    """Where the LoRA adapters requests name are found (`<name>.gguf`)."""
    images_dir: Path = field(default_factory=lambda: _home() / "images")
    """Where generated images answered by URL are kept until images_ttl_hours have passed."""
    images_ttl_hours: float = 1.0
    """Hours a generated image stays downloadable (then its file is deleted)."""
    images_public_url: str | None = None
    """The base of generated images' URLs (behind a proxy); default: the request's own host."""
    images_max_pixels: int = 2048 * 2048
    """The largest image (width x height) a generation request may ask for."""

    @property
    def home(self) -> Path:
        return _home()

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


def _timeout(key: str, value: Any) -> float:
    seconds = _duration(key, value)
    if seconds <= 0:
        raise ConfigError(f"{key}: must be above 0 seconds, got {value!r}")
    return seconds


def _duration(key: str, value: Any) -> float:
    """Seconds: a number, or a Go duration as Ollama's variables take (`5m`, `1h30m`, `-1`)."""
    text = str(value).strip()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if re.fullmatch(r"-?\d+(\.\d+)?", text):
        return float(text)
    units = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    if not parts or "".join(n + u for n, u in parts) != text.lstrip("-"):
        raise ConfigError(f"{key}: expected seconds or a duration like 5m, got {value!r}")
    sign = -1.0 if text.startswith("-") else 1.0
    return sign * sum(float(n) * units[u] for n, u in parts)


def _non_negative_duration(key: str, value: Any) -> float:
    seconds = _duration(key, value)
    if seconds < 0:
        raise ConfigError(f"{key}: must not be negative, got {value!r}")
    return seconds


@dataclass(frozen=True)
class _Key:
    attr: str
    path: str
    env: str
    parse: Callable[[str, Any], Any]
    ollama: str | None = None
    """Ollama's variable for the same setting, honoured when the XLLM_ one is unset."""
    aliases: tuple[str, str] | None = None
    """An older spelling (key path, variable), honoured when the new one is unset."""


_KEYS: tuple[_Key, ...] = (
    _Key("host", "server.host", "XLLM_HOST", _str, "OLLAMA_HOST"),
    _Key("port", "server.port", "XLLM_PORT", _positive_int),
    _Key("log_file", "server.log_file", "XLLM_LOG_FILE", _str),
    _Key("log_max_files", "server.log_rotation.max_files", "XLLM_LOG_MAX_FILES", _positive_int),
    _Key("log_max_size", "server.log_rotation.max_size", "XLLM_LOG_MAX_SIZE", _bytes),
    _Key("tls_cert", "server.tls_cert", "XLLM_TLS_CERT", _str),
    _Key("tls_key", "server.tls_key", "XLLM_TLS_KEY", _str),
    _Key(
        "cors_origins", "server.cors.allowed_origins", "XLLM_ORIGINS", _str_list, "OLLAMA_ORIGINS"
    ),
    _Key("api_keys", "server.api_keys", "XLLM_API_KEY", _str_list),
    _Key("model_management", "server.model_management", "XLLM_MODEL_MANAGEMENT", _bool),
    _Key(
        "shutdown_timeout",
        "server.shutdown_timeout",
        "XLLM_SHUTDOWN_TIMEOUT",
        _non_negative_duration,
    ),
    _Key("log_level", "server.log_level", "XLLM_LOG", _str),
    _Key("header_timeout", "server.header_timeout", "XLLM_HEADER_TIMEOUT", _timeout),
    _Key("remote_images", "server.remote_images", "XLLM_REMOTE_IMAGES", _bool),
    _Key("max_audio_upload", "server.max_audio_upload", "XLLM_MAX_AUDIO_UPLOAD", _bytes),
    _Key(
        "models_dir",
        "models.directory",
        "XLLM_MODELS_DIR",
        lambda k, v: Path(_str(k, v)),
        "OLLAMA_MODELS",
    ),
    _Key("registry", "models.registry", "XLLM_REGISTRY", _url),
    _Key("hf_endpoint", "models.hf_endpoint", "HF_ENDPOINT", _url),
    _Key("preload", "models.preload", "XLLM_PRELOAD", _str_list),
    _Key("ctx_size", "inference.ctx_size", "XLLM_CTX_SIZE", _positive_int, "OLLAMA_CONTEXT_LENGTH"),
    _Key("parallel", "inference.parallel", "XLLM_PARALLEL", _positive_int, "OLLAMA_NUM_PARALLEL"),
    _Key(
        "max_queue",
        "inference.max_queue",
        "XLLM_MAX_QUEUE",
        _clamped_int,
        "OLLAMA_MAX_QUEUE",
    ),
    _Key("max_tokens", "inference.max_tokens", "XLLM_MAX_TOKENS", _clamped_int),
    _Key("threads", "inference.threads", "XLLM_THREADS", _clamped_int),
    _Key("batch_size", "inference.batch_size", "XLLM_BATCH_SIZE", _positive_int),
    _Key("speculative", "inference.speculative", "XLLM_SPECULATIVE", _speculative),
    _Key(
        "speculative_models",
        "models.speculative",
        "XLLM_SPECULATIVE_MODELS",
        lambda k, v: _per_model(k, v, "a speculation mode", _speculative),
    ),
    _Key("draft_model", "inference.draft_model", "XLLM_DRAFT_MODEL", _str),
    _Key(
        "draft_models",
        "models.draft_model",
        "XLLM_DRAFT_MODELS",
        lambda k, v: _per_model(k, v, "its draft model", _str),
    ),
    _Key("gpu_layers", "gpu.layers", "XLLM_GPU_LAYERS", _int),
    _Key(
        "keep_alive",
        "inference.keep_alive",
        "XLLM_KEEP_ALIVE",
        _duration,
        "OLLAMA_KEEP_ALIVE",
        ("inference.idle_timeout", "XLLM_IDLE_TIMEOUT"),  # the seed's name
    ),
    _Key("memory_budget", "memory.budget", "XLLM_MEMORY_BUDGET", lambda k, v: _bytes(k, v)),
    _Key("priorities", "models.priority", "XLLM_PRIORITY", lambda k, v: _priorities(k, v)),
    _Key("replicas", "models.replicas", "XLLM_REPLICAS", lambda k, v: _replicas(k, v)),
    _Key(
        "memory_high_watermark",
        "memory.high_watermark",
        "XLLM_MEMORY_HIGH_WATERMARK",
        lambda k, v: _fraction(k, v),
    ),
    _Key("cache_ram_fraction", "cache.ram_fraction", "XLLM_CACHE_RAM_FRACTION", ram_share),
    _Key("cache_persist", "cache.persist", "XLLM_CACHE_PERSIST", _bool),
    _Key("cache_dir", "cache.directory", "XLLM_CACHE_DIR", lambda k, v: Path(_str(k, v))),
    _Key("cache_max_bytes", "cache.max_bytes", "XLLM_CACHE_MAX_BYTES", _bytes),
    _Key("loras_dir", "loras.directory", "XLLM_LORAS_DIR", lambda k, v: Path(_str(k, v))),
    _Key("remote", "engines.remote", "XLLM_REMOTE", lambda k, v: _remotes(k, v)),
    _Key("images_dir", "images.directory", "XLLM_IMAGES_DIR", lambda k, v: Path(_str(k, v))),
    _Key("images_ttl_hours", "images.ttl_hours", "XLLM_IMAGES_TTL_HOURS", _positive_float),
    _Key("images_public_url", "images.public_url", "XLLM_IMAGES_PUBLIC_URL", _url),
    _Key("images_max_pixels", "images.max_pixels", "XLLM_IMAGES_MAX_PIXELS", _positive_int),
)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict) and not any(key.path == path for key in _KEYS):
            out.update(_flatten(v, path + "."))
        else:
            out[path] = v
    return out


def config_path() -> Path:
    return Path(os.environ.get("XLLM_CONFIG") or _home() / "config.yaml").expanduser()


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat = _flatten(data)
    known = {k.path for k in _KEYS} | {k.aliases[0] for k in _KEYS if k.aliases}
    for key in flat:
        if key not in known:
            raise ConfigError(f"{path}: unknown key {key!r}")
    return flat


def _split_host(var: str, value: str) -> tuple[str, int | None]:
    """`XLLM_HOST` may be `host`, `host:port`, `[v6]:port` or a URL, as OLLAMA_HOST is."""
    value = value.strip()
    for scheme in ("http://", "https://"):
        if value.startswith(scheme):
            value = value[len(scheme) :]
    value = value.rstrip("/")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest.lstrip(":")
        return host, (_positive_int(var, port) if port else None)
    if value.count(":") == 1:
        host, port = value.split(":")
        return host or DEFAULT_HOST, _positive_int(var, port)
    return value or DEFAULT_HOST, None


def load_settings(flags: Mapping[str, Any] | None = None) -> Settings:
    """Settings from flags (attribute names, None = not given) > env > config file > defaults."""
    values: dict[str, Any] = {}
    file_values = _read_file(config_path())
    for key in _KEYS:
        old_path, old_var = key.aliases or (None, None)
        for path in (old_path, key.path):  # the new spelling last: it wins
            if path is not None and path in file_values:
                values[key.attr] = key.parse(path, file_values[path])
        names = (key.env, old_var, key.ollama)
        var = next((v for v in names if v and os.environ.get(v)), key.env)
        env = os.environ.get(var)
        if env is not None and env != "":
            if key.attr == "host":
                host, port = _split_host(var, env)
                values["host"] = host
                if port is not None:
                    values["port"] = port
            else:
                values[key.attr] = key.parse(var, env)
    for attr, value in (flags or {}).items():
        if value is not None:
            values[attr] = value
    for attr in ("models_dir", "cache_dir", "loras_dir", "images_dir"):
        if attr in values:
            values[attr] = Path(values[attr]).expanduser()
    return dataclasses.replace(Settings(), **values)
