"""`xllm plan MODEL`: what loading a model takes, against this machine's free memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xllm.cli.humanize import human_bytes

if TYPE_CHECKING:
    from xllm.memory.planner import Plan

KV_TYPES = ("f16", "q8_0", "q4_0")


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "plan", help="memory plan for a model: weights, KV cache, compute vs free memory"
    )
    p.add_argument("model", help="a GGUF file or a bundled model name")
    p.add_argument("-c", "--ctx-size", type=int, help="context per sequence (default 4096)")
    p.add_argument("-np", "--parallel", type=int, help="sequences batched together (default 16)")
    p.add_argument("--batch-size", type=int, help="tokens per decode step (default 512)")
    p.add_argument("--gpu-layers", type=int, help="layers to offload (default -1: as many as fit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def _model_files(model: str, models_dir: Path) -> list[Path]:
    """The GGUF files of a path (every file of a split model), a stored model or a bundled one."""
    from xllm.errors import ModelNotFound
    from xllm.models import gguf, names
    from xllm.models.store import Store

    path = Path(model)
    if path.is_file():
        return gguf.model_files(path)
    stored = Store(models_dir).get(names.parse_name(model))
    if stored is not None:
        return stored.files
    found = names.bundled_path(names.canonical(model))
    if found is None:
        raise ModelNotFound(f"model {model!r} not found")
    return [found]


def run(args: argparse.Namespace) -> int:
    from xllm.config import load_settings
    from xllm.errors import XllmError
    from xllm.memory import planner, probe
    from xllm.models import gguf

    s = load_settings(
        {
            "ctx_size": args.ctx_size,
            "parallel": args.parallel,
            "batch_size": args.batch_size,
            "gpu_layers": args.gpu_layers,
        }
    )
    try:
        files = _model_files(args.model, s.models_dir)
        header = gguf.read_model(files)
        label = str(files[0]) if Path(args.model).is_file() else args.model
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    gpus = probe.gpus()
    total_ram, free_ram = probe.ram()
    usable_ram = int(free_ram * (1 - planner.SAFETY))
    if s.memory_budget is not None:
        usable_ram = min(usable_ram, s.memory_budget)
    plan = planner.estimate(
        header, ctx_size=s.ctx_size, parallel=s.parallel, batch_size=s.batch_size, gpus=gpus,
        gpu_layers=s.gpu_layers,
    )  # fmt: skip
    available = usable_ram + int(sum(g.free_bytes for g in gpus) * (1 - planner.SAFETY))
    max_ctx = {
        kv: planner.max_context(
            header, available=available, parallel=s.parallel, batch_size=s.batch_size, kv_type=kv
        )
        for kv in KV_TYPES
    }
    report = {
        "model": label,
        "architecture": header.architecture,
        "layers": plan.layers,
        "ctx_size": min(s.ctx_size, header.arch_int("context_length") or s.ctx_size),
        "parallel": s.parallel,
        "weights_bytes": plan.weights,
        "kv_cache_bytes": plan.kv,
        "compute_bytes": plan.compute + plan.output,
        "total_bytes": plan.total,
        "gpu_layers": plan.gpu_layers,
        "vram_bytes": plan.vram,
        "ram_bytes": plan.ram,
        "free_ram_bytes": free_ram,
        "memory_budget_bytes": s.memory_budget,
        "gpus": [g.as_dict() for g in gpus],
        "fits": plan.ram <= usable_ram,
        "max_context_per_sequence": max_ctx,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print(label, header.architecture, plan, report, total_ram)
    return 0


def _print(label: str, arch: str, plan: Plan, report: dict[str, Any], total_ram: int) -> None:
    gpus = report["gpus"]
    where = (
        "CPU only (no GPU found)"
        if not gpus
        else f"{plan.gpu_layers}/{plan.layers + 1} layers on {len(gpus)} GPU(s)"
    )
    print(f"{Path(label).name}  ({arch}, {plan.layers} layers)")
    print(f"  context      {report['ctx_size']} x {report['parallel']} sequences")
    print(f"  weights      {human_bytes(plan.weights)}")
    print(f"  KV cache     {human_bytes(plan.kv)}  (f16)")
    print(f"  compute      {human_bytes(plan.compute + plan.output)}")
    print(f"  total        {human_bytes(plan.total)}   {where}")
    for g in gpus:
        print(f"  GPU {g['index']}        {human_bytes(g['free_bytes'])} free  {g['name']}")
    if gpus:
        print(f"  on GPUs      {human_bytes(plan.vram)}, in RAM {human_bytes(plan.ram)}")
    print(f"  free RAM     {human_bytes(report['free_ram_bytes'])} of {human_bytes(total_ram)}")
    if report["memory_budget_bytes"] is not None:
        print(f"  budget       {human_bytes(report['memory_budget_bytes'])}")
    print(f"  fits         {'yes' if report['fits'] else 'NO'}")
    sizes = ", ".join(f"{k} {v}" for k, v in report["max_context_per_sequence"].items())
    print(f"  max context per sequence: {sizes}")
