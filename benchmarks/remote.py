"""Proxy overhead of a remote model: xllm in front of an upstream vs the upstream directly.

Starts an upstream `xllm serve` (the default model, 16 slots) and a second one whose remote
endpoint is the first, then runs N concurrent streamed chat completions against each, in turns
(direct then proxied, then proxied then direct...), and prints tokens/s, TTFT p50, their ratios, the
front server's CPU time per proxied token (from /proc), the load average before and after, and
whether the targets are met (tokens/s >= 0.97x the upstream's, added TTFT p50 <= 5 ms); it
exits 1 when one is missed.

    python benchmarks/remote.py [--upstream xllm|paced] [--pin] [--streams 16] [--tokens 64]
        [--rounds 6]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests.conftest import Server, free_port, start_server, stop_server

MODEL = "smollm2:135m"
MIN_RATIO = 0.97
"""Tokens/s through xllm over the upstream's own, at least."""
MAX_ADDED_TTFT_MS = 5.0
"""TTFT p50 through xllm minus the upstream's own, at most."""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one(client: httpx.AsyncClient, url: str, model: str, tokens: int) -> tuple[float, int]:
    prompt = [{"role": "user", "content": "Tell me a story."}]
    body = {"model": model, "stream": True, "max_tokens": tokens, "temperature": 0,
            "ignore_eos": True, "messages": prompt, "cache": False}  # fmt: skip
    t0 = time.perf_counter()
    ttft, n = 0.0, 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    n += 1
                    ttft = ttft or time.perf_counter() - t0
    return ttft, n


async def round_(url: str, model: str, streams: int, tokens: int) -> tuple[float, list[float], int]:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(client, url, model, tokens) for _ in range(streams)))
        wall = time.perf_counter() - t0
    n = sum(r[1] for r in results)
    return n / wall, [r[0] for r in results], n


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument(
        "--upstream",
        choices=("xllm", "paced"),
        default="xllm",
        help="xllm: a real xllm serve sharing this machine's cores with the proxy; paced: "
        "benchmarks/paced_upstream.py, standing in for one on machines of its own",
    )
    p.add_argument(
        "--pin",
        action="store_true",
        help="with --upstream paced: the proxy on CPU 1, this client and the upstream on CPU 0, "
        "as on hosts of their own, rather than the three taking turns on the same cores",
    )
    a = p.parse_args()
    if a.pin:
        if a.upstream != "paced":  # a real upstream's decode threads need the cores
            p.error("--pin is for --upstream paced")
        if not {0, 1} <= os.sched_getaffinity(0):
            p.error("--pin needs CPUs 0 and 1")
        os.sched_setaffinity(0, {0})  # the upstream started below inherits it
    tmp = Path(tempfile.mkdtemp(prefix="xllm-remote-bench-"))
    up, model, flavour = _upstream(a.upstream, tmp, a.streams)
    remote = [{"name": "up", "base_url": up.url, "flavour": flavour, "models": {"far": model}}]
    front = start_server(tmp / "front", [], {"XLLM_REMOTE": json.dumps(remote)}, wait_model=False)
    if a.pin:
        for task in Path(f"/proc/{front.proc.pid}/task").iterdir():  # its threads so far
            os.sched_setaffinity(int(task.name), {1})
    load = os.getloadavg()
    try:
        for url, m in ((up.url, model), (front.url, "far")):  # warm both, all slots
            asyncio.run(round_(url, m, a.streams, 8))
        stats: dict[str, list[float]] = {"direct": [], "proxied": []}
        ttfts: dict[str, list[float]] = {"direct": [], "proxied": []}
        cpu, proxied_tokens = 0.0, 0
        cells = [("direct", up.url, model), ("proxied", front.url, "far")]
        for i in range(a.rounds):  # the order alternates: neither side always runs first
            for kind, url, m in cells if i % 2 == 0 else cells[::-1]:
                c0 = cpu_seconds(front.proc.pid)
                tps, ttft, n = asyncio.run(round_(url, m, a.streams, a.tokens))
                if kind == "proxied":
                    cpu += cpu_seconds(front.proc.pid) - c0
                    proxied_tokens += n
                stats[kind].append(tps)
                ttfts[kind] += ttft
        d, f = statistics.mean(stats["direct"]), statistics.mean(stats["proxied"])
        td, tf = statistics.median(ttfts["direct"]), statistics.median(ttfts["proxied"])
        ratio, added = f / d, (tf - td) * 1000
        met = {"tokens/s": ratio >= MIN_RATIO, "TTFT": added <= MAX_ADDED_TTFT_MS}
        placed = " (proxy pinned to CPU 1, the rest to CPU 0)" if a.pin else ""
        print(
            f"upstream {a.upstream}, {a.streams} streams x {a.tokens} tokens, {a.rounds} rounds, "
            f"{os.cpu_count()} CPUs{placed}, "
            f"load average {load[0]:.2f} before, {os.getloadavg()[0]:.2f} after"
        )
        print("| | tokens/s | TTFT p50 (ms) |\n|---|---|---|")
        print(f"| upstream directly | {d:.1f} | {td * 1000:.1f} |")
        print(f"| through xllm | {f:.1f} | {tf * 1000:.1f} |")
        print(f"| ratio / added | {ratio:.3f} | {added:+.1f} |")
        print(f"| target | >= {MIN_RATIO} | <= +{MAX_ADDED_TTFT_MS:g} |")
        print(f"| met | {_yes(met['tokens/s'])} | {_yes(met['TTFT'])} |")
        print(f"front server CPU per proxied token: {cpu / max(proxied_tokens, 1) * 1e6:.0f} µs")
    finally:
        stop_server(front)
        stop_server(up)
    if not all(met.values()):
        sys.exit(1)


def _upstream(kind: str, tmp: Path, streams: int) -> tuple[Server, str, str]:
    """The upstream server, the name of its model, and its flavour."""
    if kind == "xllm":
        args = ["--model", MODEL, "--parallel", str(streams), "--ctx-size", "512"]
        return start_server(tmp / "up", args), MODEL, "xllm"
    port = free_port()
    script = Path(__file__).with_name("paced_upstream.py")
    proc = subprocess.Popen([sys.executable, str(script), str(port)], start_new_session=True)
    up = Server(proc, port, tmp, tmp / "paced.log")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{up.url}/v1/models", timeout=1).status_code == 200:
                return up, "paced", "openai"
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the paced upstream did not start")


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


if __name__ == "__main__":
    main()
