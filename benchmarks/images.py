"""Image generation through xllm against stable-diffusion-cpp-python called in-process: seconds
per image at 64x64 and 256x256, with 1 and 4 steps, the same model files and threads.

    python benchmarks/images.py                       # the tests' tiny FLUX.2-klein, 2 threads
    python benchmarks/images.py --model ./sdxl-turbo --threads 4 --rounds 5

The model is a folder of parts as xllm serves them (tests/diffusion_models.py writes the tiny
random one by default). Each round times, for every size and step count, the binding's
`generate_image` plus the PNG encoding (what a caller needs to hand a file on), then right after
it the same request through `POST /v1/images/generations` (`b64_json`) of a running
`xllm serve --threads N` (HTTP, the runner's process boundary, the crop to the exact size and
base64 included). Each xllm run is compared with the direct run just before it, so the
machine's drift hits both sides of every ratio; VS DIRECT is the median of those ratios.
Target: within 1.1x. Exits 1 when it is missed.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from xllm.engine import diffusion_runner
from xllm.engine.options import EngineOptions

CELLS = ((64, 1), (64, 4), (256, 1), (256, 4))
"""(side, steps) of each measured cell."""
PROMPT = "a lighthouse on a cliff at dusk, oil painting"
TARGET = 1.1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def direct(sd: Any, side: int, steps: int, seed: int) -> float:
    """Seconds for the binding to make one image and encode it as PNG."""
    start = time.perf_counter()
    (image,) = sd.generate_image(prompt=PROMPT, width=side, height=side, sample_steps=steps,
                                 cfg_scale=1.0, seed=seed)  # fmt: skip
    image.save(io.BytesIO(), format="PNG")
    return time.perf_counter() - start


def through_xllm(http: httpx.Client, model: str, side: int, steps: int, seed: int) -> float:
    body = {"model": model, "prompt": PROMPT, "size": f"{side}x{side}", "steps": steps,
            "cfg_scale": 1.0, "seed": seed, "response_format": "b64_json"}  # fmt: skip
    start = time.perf_counter()
    r = http.post("/v1/images/generations", json=body)
    r.raise_for_status()
    return time.perf_counter() - start


def serve(folder: Path, threads: int, home: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "XLLM_HOME": str(home)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "xllm", "serve", "--port", str(port), "--threads", str(threads),
         "--model", str(folder)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(f"{url}/v0/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("xllm serve did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a folder of diffusion model parts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="xllm-bench-images-") as tmp:
        folder = args.model
        if folder is None:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.diffusion_models import write_tiny_flux2

            folder = write_tiny_flux2(Path(tmp) / "tiny-flux")
        name = folder.resolve().name
        sd = diffusion_runner.load(folder.resolve(), EngineOptions(threads=args.threads))
        proc, url = serve(folder.resolve(), args.threads, Path(tmp) / "home")
        http = httpx.Client(base_url=url, timeout=3600)  # one connection, as a client keeps it
        try:
            for side, steps in CELLS[:1]:  # warm-up: the runner loads, caches fill
                direct(sd, side, steps, 0)
                through_xllm(http, name, side, steps, 0)
            times: dict[tuple[int, int], list[tuple[float, float]]] = {c: [] for c in CELLS}
            for r in range(args.rounds):
                for side, steps in CELLS:
                    d = direct(sd, side, steps, r + 1)
                    x = through_xllm(http, name, side, steps, r + 1)
                    times[(side, steps)].append((d, x))
        finally:
            http.close()
            proc.terminate()
            proc.wait()
    load = os.getloadavg()
    print(f"model {name}, {args.threads} threads, {args.rounds} rounds; load average "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print(f"{'SIZE':<10}{'STEPS':>6}{'DIRECT S/IMAGE':>16}{'XLLM S/IMAGE':>14}{'VS DIRECT':>11}")
    worst = 0.0
    for (side, steps), pairs in times.items():
        ratio = statistics.median(x / d for d, x in pairs)
        worst = max(worst, ratio)
        print(f"{f'{side}x{side}':<10}{steps:>6}{statistics.median(d for d, _ in pairs):>16.2f}"
              f"{statistics.median(x for _, x in pairs):>14.2f}{ratio:>10.2f}x")  # fmt: skip
    print(f"target: xllm within {TARGET}x of direct: {'met' if worst <= TARGET else 'MISSED'}")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    raise SystemExit(main())
