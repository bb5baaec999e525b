"""`xllm`: argument parsing and dispatch; each command's logic lives in its own module."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from xllm import __version__
from xllm.cli import (
    archive,
    compare,
    convert,
    measure,
    models,
    plan,
    run,
    runner,
    running,
    serve,
    speak,
    transcribe,
)
from xllm.config import ConfigError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xllm",
        description="Local LLM inference server and CLI (OpenAI and Ollama APIs, llama.cpp).",
    )
    parser.add_argument("-v", "--version", action="version", version=f"xllm {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve.add_parser(commands)
    run.add_parser(commands)
    running.add_parsers(commands)
    models.add_parsers(commands)
    archive.add_parsers(commands)
    convert.add_parser(commands)
    compare.add_parser(commands)
    plan.add_parser(commands)
    measure.add_parsers(commands)
    speak.add_parser(commands)
    transcribe.add_parser(commands)
    runner.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args))
    except ConfigError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
