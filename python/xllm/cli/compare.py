"""`xllm compare A B`: two models side by side on files, offline (no server): perplexity on a
text, KL divergence and same-top-token % when they share a vocabulary, tokens/s, memory, and
a diff of their greedy outputs. The measuring runs in a child process (`xllm evaluate`, see
xllm/engine/evaluate.py) so that an abort inside llama.cpp is an error message here."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from xllm.cli.humanize import human_bytes

DEFAULT_TEXT = "pride_and_prejudice.txt"
DEFAULT_PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
)


class CompareError(Exception):
    """A model or an input compare cannot use; the message says which and why."""


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "compare",
        help="compare two models: perplexity, KL divergence, tokens/s, memory, outputs",
        description="Compare two models offline, on files: perplexity on a text by "
        "llama-perplexity's method (chunks of --ctx tokens, the second half of each scored) "
        "with its error; when they share a vocabulary, the KL divergence of B's next-token "
        "distribution from A's and how often their top tokens agree (A is the reference); "
        "prompt and generation tokens/s; file size and planned memory; a diff of their greedy "
        "outputs. The default text is the opening of Pride and Prejudice (shipped).",
    )
    p.add_argument("a", metavar="A", help="reference model: GGUF file, stored or bundled name")
    p.add_argument("b", metavar="B", help="model compared with A")
    p.add_argument("--text", type=Path, help="UTF-8 text for perplexity (default: shipped)")
    p.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    p.add_argument("--chunks", type=int, help="evaluate at most this many chunks (default all)")
    p.add_argument("--prompts", type=Path, help="file of prompts, one per line, for the diff")
    p.add_argument("--max-tokens", type=int, default=48, help="greedy tokens per prompt (48)")
    p.add_argument("--threads", type=int, help="CPU threads (default: all cores)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=compare)
    child = commands.add_parser("evaluate", add_help=False)  # internal: the measuring child
    child.set_defaults(func=lambda _: _evaluate())


def _evaluate() -> int:
    from xllm.engine.evaluate import main

    return main()


@dataclass(frozen=True)
class Resolved:
    name: str
    files: list[Path]
    file_bytes: int
    planned_bytes: int
    gpu_layers: int


def resolve(model: str, ctx: int) -> Resolved:
    """A model's files, refused unless it is a causal language model, with the planner's
    estimate for one sequence of `ctx` tokens (and the GPU layers that plan offloads)."""
    from xllm.cli.plan import model_files
    from xllm.config import load_settings
    from xllm.memory import planner, probe
    from xllm.models import gguf
    from xllm.models.metadata import capabilities

    files = model_files(model, load_settings().models_dir)
    if files[0].is_dir():
        raise CompareError(
            f"{model} is a safetensors model: convert it to GGUF first "
            f"(xllm convert {model} OUT.gguf)"
        )
    header = gguf.read_model(files)
    causal = header.metadata.get(f"{header.architecture}.attention.causal", True)
    if "embedding" in capabilities(header.metadata, infill=False) or causal is False:
        raise CompareError(
            f"{model} is an embedding model ({header.architecture}, not causal): perplexity "
            "and generation need a causal language model"
        )
    plan = planner.estimate(header, ctx_size=ctx, parallel=1, batch_size=ctx, gpus=probe.gpus())
    size = sum(f.stat().st_size for f in files)
    return Resolved(model, files, size, plan.total, plan.gpu_layers)


def _text(path: Path | None) -> tuple[str, str]:
    """(label, text) of the evaluation text."""
    if path is None:
        return DEFAULT_TEXT, (resources.files("xllm.data") / DEFAULT_TEXT).read_text("utf-8")
    try:
        return str(path), path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"--text {path}: {e}") from None


def _prompts(path: Path | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    try:
        lines = [x.strip() for x in path.read_text("utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as e:
        raise CompareError(f"--prompts {path}: {e}") from None
    prompts = [x for x in lines if x]
    if not prompts:
        raise CompareError(f"--prompts {path}: no prompts (one per line)")
    return prompts


def measure(request: dict[str, Any], show_progress: bool) -> dict[str, Any]:
    """Run the measuring child on `request`; its result, or CompareError with its reason (its
    own message, or the last lines llama.cpp logged before the process died)."""
    from xllm.engine.options import child_command

    result: dict[str, Any] | None = None
    error: str | None = None
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as log:
        with subprocess.Popen(
            child_command("evaluate"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        ) as child:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(json.dumps(request))
            child.stdin.close()
            for line in child.stdout:
                record = json.loads(line)
                if "progress" in record and show_progress:
                    done, total = record["progress"]
                    print(f"\rperplexity: chunk {done}/{total}", end="", file=sys.stderr)
                result = record.get("result", result)
                error = record.get("error", error)
        if show_progress:
            print("\r\033[K", end="", file=sys.stderr)
        if error is not None:
            raise CompareError(error)
        if result is None or child.returncode != 0:
            log.seek(0)
            tail = "\n".join(log.read().strip().splitlines()[-8:])
            raise CompareError(f"the evaluation process failed ({child.returncode}):\n{tail}")
    return result


def report(
    models: list[Resolved], text_label: str, prompts: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    request = {
        "models": [
            {
                "path": str(m.files[0]),
                "splits": [str(f) for f in m.files[1:]],
                "gpu_layers": m.gpu_layers,
            }
            for m in models
        ],
        "text": _text(args.text)[1],
        "ctx": args.ctx,
        "chunks": args.chunks,
        "threads": args.threads or len(os.sched_getaffinity(0)),
        "prompts": prompts,
        "max_tokens": args.max_tokens,
    }
    r = measure(request, show_progress=sys.stderr.isatty() and not args.json)
    a_out = r["models"][0]["generation"]["outputs"]
    b_out = r["models"][1]["generation"]["outputs"]
    return {
        "text": {
            "source": text_label,
            "tokens": r["tokens"],
            "ctx": args.ctx,
            "chunks": r["chunks"],
            "shared_vocab": r["shared_vocab"],
        },
        "models": [
            {
                "name": m.name,
                "path": str(m.files[0]),
                "file_bytes": m.file_bytes,
                "planned_bytes": m.planned_bytes,
                "vocab_digest": digest,
                "perplexity": {k: v for k, v in res.items() if k != "generation"},
                "generation": {k: v for k, v in res["generation"].items() if k != "outputs"},
            }
            for m, res, digest in zip(models, r["models"], r["vocab_digests"], strict=True)
        ],
        "divergence": r["divergence"][0] if r["divergence"] else None,
        "outputs": [
            {"prompt": p, "a": a, "b": b, "diff": diff(a, b, models[0].name, models[1].name)}
            for p, a, b in zip(prompts, a_out, b_out, strict=True)
        ],
    }


def diff(a: str, b: str, a_name: str, b_name: str) -> str:
    """A unified diff of two outputs, line by line; empty when they are equal."""
    lines = difflib.unified_diff(
        a.splitlines(), b.splitlines(), fromfile=a_name, tofile=b_name, lineterm=""
    )
    return "\n".join(lines)


def compare(args: argparse.Namespace) -> int:
    from xllm.errors import XllmError

    if args.ctx < 8 or args.ctx % 2:
        print("Error: --ctx: an even number of tokens, at least 8", file=sys.stderr)
        return 2
    for flag, value in (("--chunks", args.chunks), ("--max-tokens", args.max_tokens),
                        ("--threads", args.threads)):  # fmt: skip
        if value is not None and value < 1:
            print(f"Error: {flag}: at least 1", file=sys.stderr)
            return 2
    try:
        models = [resolve(args.a, args.ctx), resolve(args.b, args.ctx)]
        label, _ = _text(args.text)
        r = report(models, label, _prompts(args.prompts), args)
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    except CompareError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        _print(r)
    return 0


def _print(r: dict[str, Any]) -> None:
    a, b = r["models"]
    t = r["text"]
    scored = a["perplexity"]["tokens"]
    print(
        f"text: {Path(t['source']).name}, {t['tokens'][0]} tokens, {t['chunks']} chunks of "
        f"{t['ctx']}, {scored} tokens scored"
    )
    rows = [
        ("", "A", "B"),
        ("model", a["name"], b["name"]),
        ("file size", human_bytes(a["file_bytes"]), human_bytes(b["file_bytes"])),
        ("planned memory", human_bytes(a["planned_bytes"]), human_bytes(b["planned_bytes"])),
        (
            "perplexity",
            *(f"{m['perplexity']['ppl']:.4f} ± {m['perplexity']['ppl_error']:.4f}" for m in (a, b)),
        ),
        ("prompt tokens/s", *(f"{m['perplexity']['tokens_per_s']:.1f}" for m in (a, b))),
        ("generation tokens/s", *(f"{m['generation']['tokens_per_s']:.1f}" for m in (a, b))),
    ]
    width = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, width, strict=True)).rstrip())
    d = r["divergence"]
    if d is None:
        print("vocabularies differ: no KL divergence (each model scored its own tokens)")
    else:
        print(
            f"KL divergence of B from A: mean {d['kld_mean']:.6f} ± {d['kld_error']:.6f}, "
            f"median {d['kld_median']:.6f}, 99% {d['kld_p99']:.6f}, max {d['kld_max']:.6f}"
        )
        print(f"same top token: {d['same_top_pct']:.2f} ± {d['same_top_error_pct']:.2f} %")
    for i, o in enumerate(r["outputs"], 1):
        if not o["diff"]:
            print(f"\nprompt {i}: {o['prompt']!r}: same output")
            continue
        print(f"\nprompt {i}: {o['prompt']!r}")
        print(o["diff"])
