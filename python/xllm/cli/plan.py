"""`xllm plan MODEL`: what loading a model takes, against this machine's free memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from xllm.cli.humanize import human_bytes


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "plan", help="memory plan for a model: weights, KV cache, compute vs free memory"
    )
    p.add_argument("model", help="a GGUF file or a bundled model name")
    p.add_argument("-c", "--ctx-size", type=int, default=4096, help="context per sequence")
    p.add_argument("-np", "--parallel", type=int, default=16, help="sequences batched together")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from xllm.errors import XllmError
    from xllm.memory import planner, probe
    from xllm.models import gguf, names

    path = Path(args.model)
    if not path.is_file():
        try:
            found = names.bundled_path(names.canonical(args.model))
        except XllmError as e:
            print(f"Error: {e.message}", file=sys.stderr)
            return 1
        if found is None:
            print(f"Error: model {args.model!r} not found", file=sys.stderr)
            return 1
        path = found
    try:
        header = gguf.read(path)
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    gpus = probe.gpus()
    total_ram, free_ram = probe.ram()
    plan = planner.estimate(
        header,
        ctx_size=args.ctx_size,
        parallel=args.parallel,
        batch_size=args.batch_size,
        gpus=gpus,
    )
    available = int(free_ram * (1 - planner.SAFETY)) + sum(g.free_bytes for g in gpus)
    max_ctx = {
        kv: planner.max_context(
            header, available=available, parallel=args.parallel, batch_size=args.batch_size,
            kv_type=kv,
        )
        for kv in ("f16", "q8_0", "q4_0")
    }  # fmt: skip
    report = {
        "model": str(path),
        "architecture": header.architecture,
        "layers": plan.layers,
        "weights_bytes": plan.weights,
        "kv_cache_bytes": plan.kv,
        "compute_bytes": plan.compute + plan.output,
        "total_bytes": plan.total,
        "gpu_layers": plan.gpu_layers,
        "vram_bytes": plan.vram,
        "ram_bytes": plan.ram,
        "free_ram_bytes": free_ram,
        "gpus": [g.as_dict() for g in gpus],
        "fits": plan.ram <= int(free_ram * (1 - planner.SAFETY)),
        "max_context_per_sequence": max_ctx,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    where = (
        "CPU only (no GPU found)"
        if not gpus
        else f"{plan.gpu_layers}/{plan.layers + 1} layers on GPU"
    )
    print(f"{path.name}  ({header.architecture}, {plan.layers} layers)")
    print(f"  context {args.ctx_size} x {args.parallel} sequences, batch {args.batch_size}")
    print(f"  weights      {human_bytes(plan.weights)}")
    print(f"  KV cache     {human_bytes(plan.kv)}  (f16)")
    print(f"  compute      {human_bytes(plan.compute + plan.output)}")
    print(f"  total        {human_bytes(plan.total)}   {where}")
    print(f"  free RAM     {human_bytes(free_ram)} of {human_bytes(total_ram)}")
    print(f"  fits         {'yes' if report['fits'] else 'NO'}")
    print("  max context per sequence: " + ", ".join(f"{k} {v}" for k, v in max_ctx.items()))
    return 0
