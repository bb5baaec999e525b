"""Speculative decoding: xllm's modes against plain decoding and against llama-server's.

One `xllm serve` runs the target (with `--draft` loaded beside it as its draft model); each
request chooses its mode with the `speculative` field (`none`, `draft`, `ngram`, `auto`), so the
modes share the process, the cache state and the machine's load; `draft-ls` is xllm's draft mode
with llama-server's draft settings (3 tokens a draft every step, not priced: `adaptive` false;
`min_p` 0, the defaults of the llama.cpp llama-cpp-python 0.3.36 ships), so that the two draft
modes compare at the same settings.
llama-server has no per-request mode: with `--llama-server`, two more servers run beside xllm
(the same threads and slots; an idle server costs no CPU): one with the draft model (`-md`,
`--spec-type draft-simple`) and one with its n-gram lookup (`--spec-type ngram-simple`). Two
chat prompts: writing new code (little to look up) and rewriting given code with one change
(most of the answer is in the prompt). For 1 and 4 concurrent streams, greedy, each round runs
every (prompt, streams) cell in every mode, xllm's and llama-server's, alternating the order.
Prints decode tokens/s per mode, the ratios the issue sets targets for (auto/off,
draft/llama-server's draft, at xllm's settings and at llama-server's) and the share of drafted
tokens taken.

    python benchmarks/speculative.py                   # Qwen2.5-Coder 0.5B, 2 threads, 3 rounds
    python benchmarks/speculative.py --model big.gguf --draft small.gguf --llama-server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from benchmarks.serving import free_port, llama_server_binary
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
MODES = ("none", "draft", "draft-ls", "ngram", "auto")
"""xllm's modes (`draft`, `draft-ls` and `auto`'s draft model only with `--draft`)."""
SPECULATIVE = {"draft-ls": {"type": "draft", "max_draft": 3, "min_p": 0.0, "adaptive": False}}
"""A mode's `speculative` field where it is not just its type."""
LLAMA_MODES = {
    "ls-draft": ["--spec-type", "draft-simple"],
    "ls-ngram": ["--spec-type", "ngram-simple"],
}
"""llama-server's, each a server of its own (`-md` is added for the draft model)."""


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
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }
    if mode in MODES:  # xllm's field; llama-server's mode is its server's
        body["speculative"] = SPECULATIVE.get(mode, {"type": mode})
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise RuntimeError(f"{mode}: HTTP {r.status_code}: {r.text}")
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


async def run(
    urls: dict[str, str], args: argparse.Namespace, cells: dict[tuple[str, int, str], Cell]
) -> None:
    """Every round: each (prompt, streams) cell in each mode (`urls`: the server of each), into
    `cells`; the order of the modes alternates from round to round."""
    levels = [int(x) for x in args.streams.split(",")]
    modes = tuple(urls)
    clients = {m: httpx.AsyncClient(base_url=u, timeout=1800) for m, u in urls.items()}
    try:
        # untimed: every prompt in every slot's cache, the weights paged in, so that no mode's
        # first cell pays for it
        for prompt in PROMPTS.values():
            for streams in levels:
                for m in modes:
                    await asyncio.gather(
                        *(one(clients[m], args.model, prompt, m, 4) for _ in range(streams))
                    )
        for r in range(args.rounds):
            for name, prompt in PROMPTS.items():
                for streams in levels:
                    order = modes if r % 2 == 0 else modes[::-1]
                    for mode in order:
                        # untimed: the cell's prompt in as many slots of the mode's server as
                        # it has streams (the cells before left others there), so that no mode
                        # pays a prefill that another finds done; 4 tokens, so that a draft
                        # model reads it too (llama-server's decodes every target batch, xllm's
                        # catches up at its first draft)
                        await asyncio.gather(
                            *(
                                one(clients[mode], args.model, prompt, mode, 4)
                                for _ in range(streams)
                            )
                        )
                        wall, results = await measure(clients[mode], args, prompt, mode, streams)
                        cell = cells.setdefault((name, streams, mode), Cell())
                        cell.seconds += wall
                        for res in results:
                            usage = res["usage"]
                            details = usage.get("completion_tokens_details") or {}
                            accepted = details.get("accepted_prediction_tokens", 0)
                            cell.tokens += usage["completion_tokens"]
                            cell.accepted += accepted
                            cell.drafted += accepted + details.get("rejected_prediction_tokens", 0)
                            cell.texts.add(res["choices"][0]["message"]["content"])
    finally:
        for c in clients.values():
            await c.aclose()


@contextlib.contextmanager
def llama_server(args: argparse.Namespace, flags: list[str], log: Path) -> Iterator[str]:
    """llama-server on the target with `flags`, as many slots and threads as xllm had. Its
    prompt cache in RAM is off (`--cache-ram 0`) as xllm's KV on disk is: it keeps the target's
    and the draft's state of prompts evicted from the slots, and would spare only one side the
    prefill of a prompt that 4 streams of another pushed out."""
    port = free_port()
    argv = [
        llama_server_binary(), "-m", args.model_path, "--host", "127.0.0.1", "--port", str(port),
        "-t", str(args.threads), "-tb", str(args.threads), "-np", "4", "-c", str(2048 * 4),
        "--no-webui", "--cache-ram", "0", *flags,
    ]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start; log: {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def report(cells: dict[tuple[str, int, str], Cell], args: argparse.Namespace) -> None:
    modes = [m for m in (*MODES, *LLAMA_MODES) if any(k[2] == m for k in cells)]
    print(
        f"target {args.model}, draft {args.draft}, threads {args.threads}, max_tokens "
        f"{args.max_tokens}, rounds {args.rounds}, load average before {args.load_before}, "
        f"after {os.getloadavg()[0]:.2f}"
    )
    print(
        "prompt | streams | "
        + " | ".join(f"{m} tok/s" for m in modes)
        + " | auto/off | draft/ls-draft | draft-ls/ls-draft"
        + " | accepted/drafted (draft, draft-ls, ngram, auto) | same text"
    )
    auto_ratios = []
    for name in [p for p in PROMPTS if any(k[0] == p for k in cells)]:
        for streams in sorted({s for _, s, _ in cells}):
            row = {m: cells[(name, streams, m)] for m in modes}
            xllm = [row[m] for m in modes if m in MODES]
            off = row.get("none", xllm[0])  # (without none: texts checked against the first)
            auto = (
                row["auto"].rate / off.rate
                if "auto" in row and "none" in row and off.rate
                else float("nan")
            )
            if "auto" in row and "none" in row:
                auto_ratios.append(auto)
            vs = " | ".join(
                f"{row[m].rate / row['ls-draft'].rate:.2f}"
                if m in row and "ls-draft" in row and row["ls-draft"].rate
                else "-"
                for m in ("draft", "draft-ls")
            )
            shares = ", ".join(
                f"{row[m].accepted}/{row[m].drafted}"
                for m in ("draft", "draft-ls", "ngram", "auto")
                if m in row
            )
            same = (
                "yes" if all(c.texts == off.texts for c in xllm) and len(off.texts) == 1 else "NO"
            )
            rates = " | ".join(f"{row[m].rate:.2f}" for m in modes)
            print(f"{name} | {streams} | {rates} | {auto:.2f} | {vs} | {shares} | {same}")
    if auto_ratios:
        print(
            f"auto/off: min {min(auto_ratios):.2f}, geometric mean "
            f"{statistics.geometric_mean(auto_ratios):.2f}"
        )


def default_model() -> str:
    """Qwen2.5-Coder 0.5B Instruct as the tests join it (tests/conftest.py), else SmolLM2."""
    joined = Path.home() / ".cache/xllm-test-models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    return str(joined) if joined.is_file() else "smollm2:135m"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="model name or GGUF (default: Qwen2.5-Coder 0.5B if joined)")
    p.add_argument("--draft", help="a draft model GGUF for the draft and auto modes")
    p.add_argument("--llama-server", action="store_true", help="also run llama-server's modes")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", default="1,4")
    p.add_argument(
        "--modes",
        help="modes to run, xllm's and llama-server's (ls-draft, ls-ngram), comma-separated "
        "(default: all)",
    )
    p.add_argument("--prompts", help=f"of {', '.join(PROMPTS)}, comma-separated (default: all)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    args.model = args.model_path = args.model or default_model()
    args.load_before = f"{os.getloadavg()[0]:.2f}"
    if args.prompts:
        for name in set(PROMPTS) - set(args.prompts.split(",")):
            del PROMPTS[name]
    modes = MODES if args.draft else tuple(m for m in MODES if m not in ("draft", "draft-ls"))
    if args.modes:
        modes = tuple(m for m in modes if m in args.modes.split(","))
    cells: dict[tuple[str, int, str], Cell] = {}
    if args.llama_server and not Path(args.model_path).is_file():
        raise SystemExit("--llama-server needs --model as a GGUF file")
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        # the response cache off: identical greedy requests would be replayed, not decoded
        flags = ["--model", args.model, "--ctx-size", "2048", "--parallel", "4"]
        flags += ["--cache-ram-fraction", "0", "--no-cache-persist"]
        flags += ["--draft-model", args.draft] if args.draft else []
        server = start_server(Path(tmp), [*flags, "--threads", str(args.threads)])
        stack.callback(stop_server, server)
        health = httpx.get(f"{server.url}/v0/health").json()
        args.model = health["models"][0]["name"]
        urls = dict.fromkeys(modes, server.url)
        # every server up at once (idle ones cost no CPU), so that the rounds alternate them
        wanted = args.modes.split(",") if args.modes else LLAMA_MODES
        for mode, extra in LLAMA_MODES.items() if args.llama_server else ():
            if (mode == "ls-draft" and not args.draft) or mode not in wanted:
                continue
            extra = [*extra, "-md", args.draft] if mode == "ls-draft" else extra
            urls[mode] = stack.enter_context(llama_server(args, extra, Path(tmp) / f"{mode}.log"))
        asyncio.run(run(urls, args, cells))
    report(cells, args)


if __name__ == "__main__":
    main()
