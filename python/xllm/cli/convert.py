"""`xllm convert IN OUT`: a Hugging Face safetensors folder (or a stored safetensors model) to
GGUF, optionally quantized, or a GGUF file back to a Hugging Face folder; offline, on files
(no server)."""

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
        help="convert a Hugging Face safetensors model to GGUF (optionally quantized), or back",
        description="Convert a Hugging Face model folder (config.json, *.safetensors, "
        "tokenizer.json), or a safetensors model pulled into the store, to one GGUF file; or "
        "a .gguf file to a Hugging Face folder (config.json, model.safetensors with quantized "
        "weights dequantized, tokenizer.json, tokenizer_config.json). Architectures: bert, "
        "llama, qwen2, gemma3. No torch needed.",
    )
    p.add_argument(
        "input", metavar="IN", help="model folder, the name of a stored model, or a .gguf file"
    )
    p.add_argument(
        "output", metavar="OUT", help="the GGUF file to write (a new folder when IN is .gguf)"
    )
    p.add_argument("--outtype", choices=["f32", "f16", "bf16", "q8_0"],
                   help="type of the weights: to GGUF f32, f16 (default), bf16 or q8_0, norms "
                   "and biases staying f32; to safetensors f32, f16 or bf16 (default: float "
                   "tensors keep their type, quantized ones become f32)")  # fmt: skip
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


def to_folder(path: Path, out: Path, outtype: str | None, quantize: str | None) -> None:
    """GGUF -> a Hugging Face folder, drawing progress on stderr."""
    from xllm.models.convert.hf_folder import convert_gguf

    if quantize:
        raise ValueError("--quantize makes a GGUF: it does not apply to converting one back")
    progress = Progress()
    try:
        arch, tensors = convert_gguf(path, out, outtype, lambda n, total: progress.update(
            {"status": "converting", "digest": "convert", "total": total,
             "completed": n}))  # fmt: skip
    finally:
        progress.finish()
    print(f"wrote {out}/ ({arch}, {tensors} tensors)", file=sys.stderr)


def convert(args: argparse.Namespace) -> int:
    from xllm.errors import XllmError

    t0 = time.perf_counter()
    source = Path(args.input).expanduser()
    try:
        if source.suffix.lower() == ".gguf" and source.is_file():
            to_folder(source, Path(args.output), args.outtype, args.quantize)
        else:
            run(source_folder(args.input), Path(args.output), args.outtype or "f16", args.quantize)
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    print(f"done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0
