"""`xllm runner` and `xllm render`: internal, started by the server to host one model and by
that model's runner to render its chat templates (not listed in --help)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    p = commands.add_parser("runner", add_help=False)
    p.add_argument("--fd", type=int, required=True)
    p.add_argument("--deltas-fd", type=int, help="llama.cpp: where its batching loop writes")
    p.add_argument("--name", required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--options", required=True)
    p.add_argument(
        "--engine", default="llama.cpp", choices=("llama.cpp", "whisper", "piper", "diffusion")
    )
    p.set_defaults(func=run)
    commands.add_parser("render", add_help=False).set_defaults(func=render)


def run(args: argparse.Namespace) -> int:
    if args.engine == "whisper":
        from xllm.engine.whisper_runner import main as whisper

        return whisper(args.fd, args.name, args.model, args.options)
    if args.engine == "piper":
        from xllm.engine.piper_runner import main as piper

        return piper(args.fd, args.name, args.model, args.options)
    if args.engine == "diffusion":
        from xllm.engine.diffusion_runner import main as diffusion

        return diffusion(args.fd, args.name, args.model, args.options)
    from xllm.engine.runner import main

    if args.deltas_fd is None:
        raise SystemExit("xllm runner: the llama.cpp engine needs --deltas-fd")
    return main(args.fd, args.deltas_fd, args.name, args.model, args.options)


def render(_: argparse.Namespace) -> int:
    from xllm.engine.render import main

    return main()
