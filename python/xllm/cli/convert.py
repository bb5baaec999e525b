"""`xllm convert IN OUT`: a Hugging Face safetensors folder (or a stored safetensors model) to
GGUF, optionally quantized; offline, on files (no server)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from xllm.cli.progress import Progress


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "convert",
        help="convert a Hugging Face safetensors model to GGUF (optionally quantized)",
        description="Convert a Hugging Face model folder (config.json, *.safetensors, "
        "tokenizer.json), or a safetensors model pulled into the store, to one GGUF file. "
        "Architectures: bert, llama, qwen2. No torch needed.",
    )
    p.add_argument("input", metavar="IN", help="model folder, or the name of a stored model")
    p.add_argument("output", metavar="OUT", help="the GGUF file to write")
    p.add_argument("--outtype", default="f16", choices=["f32", "f16", "bf16", "q8_0"],
                   help="type of the weights (default f16; norms and biases stay f32)")  # fmt: skip
    p.add_argument(
        "-q", "--quantize", metavar="TYPE",
        help="then quantize with llama.cpp: Q4_K_M, Q5_K_M, Q8_0, Q4_0, ...",
    )  # fmt: skip
    p.set_defaults(func=convert)


def source_folder(value: str) -> Path:
    """IN as a folder: itself, or a stored safetensors model's folder in the store."""
    path = Path(value).expanduser()
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf" and path.is_file():
        raise ValueError(f"{value} is already GGUF (GGUF -> safetensors is not supported yet)")
    from xllm.config import load_settings
    from xllm.models.names import parse_name
    from xllm.models.store import SAFETENSORS_FORMAT, Store

    s = Store(load_settings().models_dir)
    stored = s.get(parse_name(value))
    if stored is None:
        raise ValueError(f"{value}: no such folder, and no stored model of that name")
    if stored.format != SAFETENSORS_FORMAT:
        raise ValueError(f"{value} is a GGUF model already: nothing to convert")
    return s.model_dir(stored)


def run(folder: Path, out: Path, outtype: str, quantize: str | None) -> None:
    """Convert (then quantize), drawing progress on stderr."""
    from xllm.models.convert import convert as to_gguf
    from xllm.models.convert import quantize as q

    progress = Progress()
    if quantize:
        q.file_type(quantize)  # an unknown type fails before the conversion, not after
    first = out.with_name(f".{out.name}.{outtype}.gguf") if quantize else out
    try:
        done = to_gguf(folder, first, outtype, lambda n, total: progress.update(
            {"status": "converting", "digest": "convert", "total": total,
             "completed": n}))  # fmt: skip
        progress.finish()
        if quantize:
            size = first.stat().st_size
            q.quantize(first, out, quantize, lambda n, total: progress.update(
                {"status": f"quantizing {quantize.upper()}", "digest": "quantize",
                 "total": size, "completed": size * n // total}))  # fmt: skip
            progress.finish()
    finally:
        progress.finish()
        if quantize:
            first.unlink(missing_ok=True)
    print(f"wrote {out} ({done.architecture}, {done.tensors} tensors)", file=sys.stderr)


def convert(args: argparse.Namespace) -> int:
    from xllm.errors import XllmError

    t0 = time.perf_counter()
    try:
        run(source_folder(args.input), Path(args.output), args.outtype, args.quantize)
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
