"""`xllm serve`: run the HTTP server in the foreground."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xllm.config import ConfigError, ram_share
from xllm.engine.protocol import SPECULATIVE
from xllm.errors import XllmError
from xllm.models.names import DEFAULT_MODEL

log = logging.getLogger("xllm")


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "serve",
        help="start the HTTP server (OpenAI /v1, Ollama /api, xllm /v0)",
        description="Start the xllm server in the foreground. Models load on first request; "
        f"the bundled default is {DEFAULT_MODEL}.",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1; env XLLM_HOST)")
    p.add_argument("--port", type=int, help="port (default 32769; env XLLM_PORT)")
    p.add_argument(
        "-m", "--model", "--preload", dest="models", action="append", default=None,
        metavar="MODEL", help="model name or GGUF file to load at start (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--mmproj", action="append", default=None, metavar="FILE",
        help="a vision projector GGUF for the --model GGUF file given in the same place "
        "(the first --mmproj goes with the first file, ...)",
    )  # fmt: skip
    p.add_argument("-c", "--ctx-size", type=int, help="context tokens per sequence (default 4096)")
    p.add_argument("-t", "--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("-np", "--parallel", type=int, help="sequences batched per model (default 16)")
    p.add_argument("--max-queue", type=int, help="waiting requests before 503 (default 1000)")
    p.add_argument(
        "--max-tokens", type=int, help="tokens a request may generate at most (default 0: no cap)"
    )
    p.add_argument("--batch-size", type=int, help="tokens per decode step (default 512)")
    p.add_argument("--gpu-layers", type=int, help="layers to offload to GPU (default -1: all)")
    p.add_argument(
        "--spec", choices=SPECULATIVE, dest="speculative",
        help="speculation for requests that do not choose: ngram (prompt lookup), draft (the "
        "draft model), auto (either, as far as measured step costs say it pays) or none "
        "(default; env XLLM_SPECULATIVE)",
    )  # fmt: skip
    p.add_argument(
        "--draft-model", metavar="MODEL",
        help="a draft model (name or GGUF file) loaded beside each model, sharing its "
        "vocabulary, for draft-model speculation (env XLLM_DRAFT_MODEL)",
    )  # fmt: skip
    p.add_argument(
        "--shutdown-timeout", type=float, metavar="SECONDS",
        help="seconds SIGTERM lets running requests finish before cutting them (default 30)",
    )  # fmt: skip
    p.add_argument(
        "--cache-ram-fraction", metavar="SHARE",
        type=_ram_share,
        help="share of RAM the temperature-0 response cache may hold (default 0.02; 0: off)",
    )  # fmt: skip
    p.add_argument(
        "--cache-persist", action=argparse.BooleanOptionalAction, default=None,
        help="save finished sequences' KV state on disk for prompts that go on from them "
        "(default on; env XLLM_CACHE_PERSIST)",
    )  # fmt: skip
    p.add_argument(
        "--loras-dir", type=Path, metavar="DIR",
        help="where LoRA adapters requests name are found, as DIR/NAME.gguf "
        "(default ~/.xllm/loras; env XLLM_LORAS_DIR)",
    )  # fmt: skip
    p.add_argument("--log-file", help="also log to this file, rotated daily")
    p.add_argument("--tls-cert", help="serve HTTPS with this PEM certificate (env XLLM_TLS_CERT)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert (env XLLM_TLS_KEY)")
    p.set_defaults(func=run)


def _ram_share(value: str) -> float:
    try:
        return ram_share("--cache-ram-fraction", value)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    flags = {
        "host": args.host,
        "port": args.port,
        "ctx_size": args.ctx_size,
        "threads": args.threads,
        "parallel": args.parallel,
        "max_queue": args.max_queue,
        "max_tokens": args.max_tokens,
        "batch_size": args.batch_size,
        "gpu_layers": args.gpu_layers,
        "speculative": args.speculative,
        "draft_model": args.draft_model,
        "shutdown_timeout": args.shutdown_timeout,
        "cache_ram_fraction": args.cache_ram_fraction,
        "cache_persist": args.cache_persist,
        "loras_dir": args.loras_dir,
        "log_file": args.log_file,
        "tls_cert": args.tls_cert,
        "tls_key": args.tls_key,
    }
    try:
        serve_forever(args.models or [], flags, [Path(p) for p in args.mmproj or ()])
    except FileNotFoundError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except XllmError as e:  # a projector that is none, or does not fit its model
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        log.error("cannot serve: %s", e)
        return 1
    return 0


def serve_forever(
    models: list[str], flags: dict[str, Any], projectors: Sequence[Path] = ()
) -> None:
    """Run the server until SIGINT/SIGTERM; `models` are names, GGUF files or model folders
    (of the formats in models/folders.py, for the engines that serve them) to preload;
    `projectors` go with the files among them, in order."""
    # imported here so that `xllm --version` and the other commands start fast
    from xllm.config import load_settings
    from xllm.log import setup_logging
    from xllm.models import folders
    from xllm.server.app import create_app, make_registry, serve

    paths: list[Path] = []
    names: list[str] = []
    for m in models:
        if m.endswith(".gguf") or ("/" in m and Path(m).exists()):
            if not Path(m).is_file() and folders.local_files(Path(m)) is None:
                raise FileNotFoundError(f"model file not found: {m}")
            paths.append(Path(m))
        else:
            names.append(m)
    if len(projectors) > len(paths):
        raise FileNotFoundError(
            f"{len(projectors)} --mmproj given for {len(paths)} --model file(s): each projector "
            "goes with a model file"
        )
    for p in projectors:
        if not p.is_file():
            raise FileNotFoundError(f"projector file not found: {p}")
    settings = load_settings(flags)
    setup_logging(
        settings.log_level, settings.log_file, settings.log_max_files, settings.log_max_size
    )
    registry = make_registry(settings)
    given = [*projectors, *[None] * (len(paths) - len(projectors))]
    added = [registry.add_path(p, projector) for p, projector in zip(paths, given, strict=True)]
    preload = list(settings.preload) + names + added
    settings = dataclasses.replace(settings, preload=tuple(preload))
    app = create_app(settings, registry)
    import uvloop

    uvloop.run(serve(app, settings.host, settings.port))
