"""`xllm speak`: text to speech through the server (`POST /v1/audio/speech`), written to a file
or stdout as it streams in."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from xllm.cli import client

DEFAULT_MODEL = "piper:joe"
SUFFIXES = {".mp3": "mp3", ".opus": "opus", ".ogg": "opus", ".aac": "aac", ".flac": "flac",
            ".wav": "wav", ".pcm": "pcm", ".raw": "pcm"}  # fmt: skip


def add_parser(commands: Any) -> None:
    p = commands.add_parser("speak", help="speak text with a voice (to a file or stdout)")
    p.add_argument("text", nargs="?", help="the text (default: stdin)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL, help=f"the voice ({DEFAULT_MODEL})")
    p.add_argument("--voice", help="one of the model's voices (a multi-speaker voice's speaker)")
    p.add_argument("--speed", type=float, default=1.0, help="0.25 to 4 (default 1)")
    p.add_argument("-o", "--output", type=Path, help="the file; its suffix sets the format")
    p.add_argument("--format", choices=sorted(set(SUFFIXES.values())),
                   help="the format (default: from -o's suffix, else mp3)")  # fmt: skip
    p.set_defaults(func=speak)


def speak(args: argparse.Namespace) -> int:
    text = args.text if args.text not in (None, "-") else sys.stdin.read()
    fmt = args.format
    if fmt is None and args.output is not None:
        fmt = SUFFIXES.get(args.output.suffix.lower())
        if fmt is None:
            known = ", ".join(SUFFIXES)
            print(f"Error: cannot tell the format from {args.output.name!r} (known suffixes: "
                  f"{known}); give --format", file=sys.stderr)  # fmt: skip
            return 2
    if args.output is None and sys.stdout.isatty():
        print("Error: give -o FILE (or redirect stdout): audio is not for the terminal",
              file=sys.stderr)  # fmt: skip
        return 2
    body: dict[str, Any] = {"model": args.model, "input": text, "speed": args.speed,
                            "response_format": fmt or "mp3"}  # fmt: skip
    if args.voice is not None:
        body["voice"] = args.voice
    try:
        chunks = client.stream_bytes("POST", "/v1/audio/speech", body)
        first = next(chunks, b"")  # a refused request leaves no file behind
        if args.output is None:
            _write(first, chunks, sys.stdout.buffer)
        else:
            with args.output.open("wb") as f:
                _write(first, chunks, f)
    except (client.NoServer, RuntimeError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


def _write(first: bytes, rest: Iterator[bytes], out: BinaryIO) -> None:
    out.write(first)
    for chunk in rest:
        out.write(chunk)
        out.flush()
