"""`xllm profile` and `xllm benchmark`: a model measured through the running server."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable
from typing import Any

from xllm.cli import client
from xllm.cli.humanize import human_bytes, table
from xllm.cli.progress import Progress


def add_parsers(commands: Any) -> None:
    p = commands.add_parser(
        "profile",
        help="load time, memory, time to first token and tokens/s of a model",
        description="Unload MODEL, time its load, then measure memory (planned and measured), "
        "time to first token, prompt and generation tokens/s through the running server.",
    )
    p.add_argument("model")
    p.add_argument("--prompt-tokens", type=_positive, default=512, metavar="N",
                   help="length of the prompt that measures prompt tokens/s (default 512, "
                   "capped to the context)")  # fmt: skip
    p.add_argument("--gen-tokens", type=_positive, default=64, metavar="N",
                   help="tokens to generate for the generation rate (default 64)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.set_defaults(func=profile)

    p = commands.add_parser(
        "benchmark",
        help="throughput and latency percentiles at several concurrencies and lengths",
        description="Streamed completions (ignore_eos, exact lengths) through the running "
        "server: for every prompt length, generation length and concurrency C, C clients each "
        "send --requests requests in a row. Reports prompt and generation tokens/s and "
        "TTFT, inter-token and end-to-end latency percentiles. Progress goes to stderr.",
    )
    p.add_argument("model")
    p.add_argument("--concurrency", type=_positive_list, default=(1, 4, 16), metavar="C,...",
                   help="concurrent clients (default 1,4,16)")  # fmt: skip
    p.add_argument("--prompt-tokens", type=_positive_list, default=(512,), metavar="N,...",
                   help="prompt lengths in tokens (default 512)")  # fmt: skip
    p.add_argument("--gen-tokens", type=_positive_list, default=(128,), metavar="N,...",
                   help="tokens generated per request (default 128)")  # fmt: skip
    p.add_argument("--requests", type=_positive, default=4, metavar="N",
                   help="requests each concurrent client sends (default 4)")  # fmt: skip
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", dest="format", action="store_const", const="json",
                     help="print JSON")  # fmt: skip
    out.add_argument("--report", dest="format", action="store_const", const="markdown",
                     help="print a Markdown table")  # fmt: skip
    out.add_argument("--prometheus", dest="format", action="store_const", const="prometheus",
                     help="print Prometheus text exposition format")  # fmt: skip
    p.set_defaults(func=benchmark, format="text")


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a positive whole number")
    return n


def _positive_list(value: str) -> tuple[int, ...]:
    return tuple(_positive(v.strip()) for v in value.split(","))


def _reporting(fn: Callable[[], None]) -> int:
    try:
        fn()
    except RuntimeError as e:  # no server, an HTTP error, a failed request
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


def profile(args: argparse.Namespace) -> int:
    from xllm.measure.profile import profile as measure

    def show() -> None:
        print(f"profiling {args.model}...", file=sys.stderr)
        p = measure(args.model, args.prompt_tokens, args.gen_tokens)
        print(json.dumps(p, indent=2) if args.json else _profile_text(p))

    return _reporting(show)


def _size(n: int | None) -> str:
    return "unknown (server on another machine)" if n is None else human_bytes(n)


def _profile_text(p: dict[str, Any]) -> str:
    rows = [
        ["model", p["model"]],
        ["load time", f"{p['load_s']:.2f} s"],
        ["RAM planned", _size(p["ram_planned_bytes"])],
        ["RAM measured", f"{_size(p['ram_measured_bytes'])} (runner resident memory)"],
        ["VRAM planned", f"{_size(p['vram_planned_bytes'])} ({p['gpu_layers']} layers on GPU)"],
        ["VRAM measured", f"{_size(p['vram_measured_bytes'])} (GPU memory taken by the load)"],
        ["time to first token", f"{p['ttft_ms']:.1f} ms ({p['ttft_prompt_tokens']} tokens)"],
        [
            "prompt",
            f"{p['prompt_tokens_per_second']:.1f} tokens/s "
            f"({p['prompt_tokens']} tokens in {p['prompt_s'] * 1000:.0f} ms)",
        ],
        [
            "generation",
            f"{p['generation_tokens_per_second']:.1f} tokens/s "
            f"({p['generated_tokens']} tokens, {p['generation_s'] * 1000:.0f} ms "
            "from the first to the last)",
        ],
    ]
    return table(rows)


def benchmark(args: argparse.Namespace) -> int:
    from xllm.measure import benchmark as bench
    from xllm.measure import report

    def show() -> None:
        plan = bench.Plan(
            args.model, args.concurrency, args.prompt_tokens, args.gen_tokens, args.requests
        )
        progress = Progress(amount=str)
        progress.update({"status": f"loading {args.model}"})
        pool = bench.prepare(args.model)
        progress.update({"status": f"benchmarking {args.model}: {plan.total_requests} requests"})

        def on_cell(label: str, done: int, total: int) -> None:
            progress.update({"status": label, "digest": label, "total": total, "completed": done})

        try:
            cells = asyncio.run(bench.run(plan, pool, on_cell))
        finally:
            progress.finish()
        doc = report.document(
            args.model, client.base_url(), args.requests, [c.summary() for c in cells]
        )
        render = {
            "text": report.as_text,
            "json": report.as_json,
            "markdown": report.as_markdown,
            "prometheus": report.as_prometheus,
        }[args.format]
        print(render(doc).rstrip("\n"))

    return _reporting(show)
