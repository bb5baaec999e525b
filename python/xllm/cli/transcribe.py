"""`xllm transcribe FILE`: speech to text through the server's `/v1/audio/transcriptions`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from xllm.cli import client

DEFAULT_MODEL = "whisper:base"


def add_parser(commands: Any) -> None:
    p = commands.add_parser("transcribe", help="transcribe an audio file (Whisper)")
    p.add_argument("file", type=Path, help="audio in any common format (wav, mp3, m4a, ogg...)")
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"a transcription model (default {DEFAULT_MODEL})")  # fmt: skip
    p.add_argument("--format", default="text",
                   choices=("text", "json", "verbose_json", "srt", "vtt"))  # fmt: skip
    p.add_argument("-l", "--language", help="the spoken language (en, de...); default: detected")
    p.add_argument("--prompt", help="text that goes before the audio (names, spellings)")
    p.add_argument("--temperature", type=float)
    p.add_argument("--translate", action="store_true", help="English text, whatever is spoken")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as e:
        print(f"Error: {args.file}: {e.strerror}", file=sys.stderr)
        return 1
    fields = {"model": args.model, "response_format": args.format}
    for key in ("language", "prompt", "temperature"):
        if getattr(args, key) is not None:
            fields[key] = str(getattr(args, key))
    path = "/v1/audio/translations" if args.translate else "/v1/audio/transcriptions"
    try:
        body = client.post_form(path, fields, args.file.name, data)
    except (client.NoServer, client.HTTPStatus) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    text = body.decode("utf-8", "replace")
    if args.format in ("json", "verbose_json"):
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False) + "\n"
    sys.stdout.write(text)
    return 0
