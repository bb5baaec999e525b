"""Draft-free speculation: xllm with n-gram lookup against plain decoding, on one server.

One `xllm serve` runs the model; each request chooses its mode with the `speculative` field
(`none` or `ngram`), so both modes share the process, the cache state and the machine's load.
Two chat prompts: writing new code (little to look up) and rewriting given code with one change
(most of the answer is in the prompt). For 1 and 4 concurrent streams, greedy, each round runs
every (prompt, streams) cell in both modes, alternating which goes first. Prints decode
tokens/s per mode, ngram/off, and the share of drafted tokens the model accepted.

    python benchmarks/speculative.py                   # Qwen2.5-Coder 0.5B, 2 threads, 3 rounds
    python benchmarks/speculative.py --model smollm2:135m --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.conftest import start_server, stop_server

CODE = """import csv
from dataclasses import dataclass


@dataclass
class Record:
    name: str
    age: int
    city: str


def parse_record(row: list[str]) -> Record:
    name, age, city = row
    return Record(name=name.strip(), age=int(age), city=city.strip())


def read_records(path: str) -> list[Record]:
    with open(path, newline="") as f:
        reader = csv.reader(f)
        next(reader)  # the header
        return [parse_record(row) for row in reader]


def oldest(records: list[Record]) -> Record:
    return max(records, key=lambda r: r.age)
"""

PROMPTS = {
    "write": "Write a Python function that parses an ISO 8601 date string into a datetime "
    "without using the datetime.fromisoformat method. Answer with code only.",
    "rewrite": "Rename the function parse_record to parse_row in this file and return the "
    f"whole file, changing nothing else. Answer with code only.\n\n```python\n{CODE}```",
}
MODES = ("none", "ngram")


@dataclass
class Cell:
    tokens: int = 0
    seconds: float = 0.0
    drafted: int = 0
    accepted: int = 0
    texts: set[str] = field(default_factory=set)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def one(
    client: httpx.AsyncClient, model: str, prompt: str, mode: str, max_tokens: int
) -> dict[str, Any]:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "speculative": {"type": mode},
    }
    r = await client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    result: dict[str, Any] = r.json()
    return result


async def measure(
    client: httpx.AsyncClient, args: argparse.Namespace, prompt: str, mode: str, streams: int
) -> tuple[float, list[dict[str, Any]]]:
    t0 = time.monotonic()
    done = await asyncio.gather(
        *(one(client, args.model, prompt, mode, args.max_tokens) for _ in range(streams))
    )
    return time.monotonic() - t0, list(done)


async def run(url: str, args: argparse.Namespace) -> dict[tuple[str, int, str], Cell]:
    levels = [int(x) for x in args.streams.split(",")]
    cells = {(p, s, m): Cell() for p in PROMPTS for s in levels for m in MODES}
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        await one(client, args.model, "Hi", "none", 4)  # warm-up
        for r in range(args.rounds):
            for name, prompt in PROMPTS.items():
                for streams in levels:
                    order = MODES if r % 2 == 0 else MODES[::-1]
                    for mode in order:
                        wall, results = await measure(client, args, prompt, mode, streams)
                        cell = cells[(name, streams, mode)]
                        cell.seconds += wall
                        for res in results:
                            usage = res["usage"]
                            details = usage["completion_tokens_details"]
                            cell.tokens += usage["completion_tokens"]
                            cell.accepted += details["accepted_prediction_tokens"]
                            cell.drafted += (
                                details["accepted_prediction_tokens"]
                                + details["rejected_prediction_tokens"]
                            )
                            cell.texts.add(res["choices"][0]["message"]["content"])
    return cells


def report(cells: dict[tuple[str, int, str], Cell], args: argparse.Namespace) -> None:
    print(
        f"model {args.model}, threads {args.threads}, max_tokens {args.max_tokens}, "
        f"rounds {args.rounds}"
    )
    print("prompt | streams | off tok/s | ngram tok/s | ngram/off | accepted/drafted | same text")
    ratios = []
    for name in PROMPTS:
        for streams in sorted({s for _, s, _ in cells}):
            off, ngram = cells[(name, streams, "none")], cells[(name, streams, "ngram")]
            ratio = ngram.rate / off.rate if off.rate else float("nan")
            ratios.append(ratio)
            share = f"{ngram.accepted}/{ngram.drafted}"
            same = "yes" if off.texts == ngram.texts and len(off.texts) == 1 else "NO"
            print(
                f"{name} | {streams} | {off.rate:.2f} | {ngram.rate:.2f} | {ratio:.2f} | "
                f"{share} | {same}"
            )
    print(f"geometric mean ngram/off: {statistics.geometric_mean(ratios):.2f}")


def default_model() -> str:
    """Qwen2.5-Coder 0.5B Instruct as the tests join it (tests/conftest.py), else SmolLM2."""
    joined = Path.home() / ".cache/xllm-test-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    return str(joined) if joined.is_file() else "smollm2:135m"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model name or GGUF (default: Qwen2.5-Coder 0.5B if joined)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    args.model = args.model or default_model()
    with tempfile.TemporaryDirectory() as tmp:
        # the response cache off: identical greedy requests would be replayed, not decoded
        flags = ["--model", args.model, "--ctx-size", "2048", "--parallel", "4"]
        flags += ["--cache-ram-fraction", "0"]
        server = start_server(Path(tmp), [*flags, "--threads", str(args.threads)])
        try:
            health = httpx.get(f"{server.url}/v0/health").json()
            args.model = health["models"][0]["name"]
            cells = asyncio.run(run(server.url, args))
        finally:
            stop_server(server)
    report(cells, args)


if __name__ == "__main__":
    main()
