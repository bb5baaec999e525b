"""`xllm plan MODEL`: what loading a model takes, against this machine's free memory."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xllm.cli.humanize import human_bytes

if TYPE_CHECKING:
    from xllm.config import Settings
    from xllm.memory.advice import PlanRequest

KV_TYPES = ("f16", "q8_0", "q4_0")


def add_parser(commands: Any) -> None:
    p = commands.add_parser(
        "plan", help="memory plan for a model: weights, KV cache, compute vs free memory"
    )
    p.add_argument("model", nargs="?", help="a GGUF file, a stored or a bundled model name")
    p.add_argument("--hf", metavar="ORG/REPO", help="a Hugging Face repo: its config.json")
    for flag, kind, text in (
        ("--params", float, "manual model: parameter count (e.g. 8e9)"),
        ("--layers", int, "manual model: layers"),
        ("--hidden-size", int, "manual model: hidden size"),
        ("--heads", int, "manual model: attention heads"),
        ("--kv-heads", int, "manual model: KV heads (GQA; default: heads)"),
        ("--head-dim", int, "manual model: head dimension (default hidden size / heads)"),
        ("--vocab", int, "manual model: vocabulary size (default 32000)"),
    ):
        p.add_argument(flag, type=kind, help=text)
    p.add_argument("--quant", help="weights: gguf (the file's), fp32, fp16, bf16, int8, int4 "
                   "or a GGUF type (q8_0, q6_k, q5_k, q5_0, q4_k, q4_0, q3_k, q2_k)")  # fmt: skip
    p.add_argument("--kv-type", choices=KV_TYPES, help="KV cache type for the what-if plan")
    p.add_argument("--margin-mb", type=float, help="memory kept free per device (default 500)")
    p.add_argument("--backend", choices=("llama.cpp", "vllm", "autogptq", "transformers"))
    p.add_argument("--gpu-memory-utilization", type=float, help="vLLM's share of a GPU (0.9)")
    p.add_argument("--gpus", help="GPU indices to use, e.g. 0,1 (default: all)")
    p.add_argument("--vram-mb", help="what-if: free MB per GPU instead of this machine's, "
                   "e.g. 24000,24000")  # fmt: skip
    p.add_argument("-c", "--ctx-size", type=int, help="context per sequence (default 4096)")
    p.add_argument("-np", "--parallel", type=int, help="sequences batched together (default 16)")
    p.add_argument("--batch-size", type=int, help="tokens per decode step (default 512)")
    p.add_argument("--gpu-layers", type=int, help="layers to offload (default -1: as many as fit)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def model_files(model: str, models_dir: Path) -> list[Path]:
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


def _numbers(text: str | None, kind: type[float] | type[int], flag: str) -> list[Any] | None:
    if text is None:
        return None
    try:
        return [kind(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected numbers separated by commas, got {text!r}") from None


def _request(args: argparse.Namespace, s: Settings) -> PlanRequest:
    from xllm.memory.advice import PlanRequest

    fields = {
        "model": args.model, "hf": args.hf, "params": args.params, "layers": args.layers,
        "hidden_size": args.hidden_size, "heads": args.heads, "kv_heads": args.kv_heads,
        "head_dim": args.head_dim, "vocab": args.vocab, "quant": args.quant,
        "kv_type": args.kv_type, "ctx_size": s.ctx_size, "parallel": s.parallel,
        "batch_size": s.batch_size, "safety_margin_mb": args.margin_mb, "backend": args.backend,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "gpus": _numbers(args.gpus, int, "--gpus"),
        "vram_mb": _numbers(args.vram_mb, float, "--vram-mb"),
    }  # fmt: skip
    return PlanRequest(**{k: v for k, v in fields.items() if v is not None})


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from xllm.config import load_settings
    from xllm.errors import XllmError
    from xllm.memory import advice

    s = load_settings(
        {
            "ctx_size": args.ctx_size,
            "parallel": args.parallel,
            "batch_size": args.batch_size,
            "gpu_layers": args.gpu_layers,
        }
    )
    try:
        what_if = advice.plan(s, _request(args, s), files_allowed=True)
        report = _load_plan(args.model, s, what_if) if args.model is not None else what_if
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(x) for x in err["loc"]) or "request"
        print(f"Error: {field}: {err['msg']}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    if args.model is not None:
        _print(report)
    _print_what_if(what_if)
    return 0


def _load_plan(model: str, s: Settings, what_if: dict[str, Any]) -> dict[str, Any]:
    """What loading a local model with the server's settings takes on this machine (the
    plan the loader makes), with the what-if plan under `what_if`."""
    from xllm.memory import planner, probe
    from xllm.models import gguf

    files = model_files(model, s.models_dir)
    header = gguf.read_model(files)
    label = str(files[0]) if Path(model).is_file() else model
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
    return {
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
        "total_ram_bytes": total_ram,
        "memory_budget_bytes": s.memory_budget,
        "gpus": [g.as_dict() for g in gpus],
        "fits": plan.ram <= usable_ram,
        "max_context_per_sequence": max_ctx,
        "what_if": what_if,
    }


def _print_what_if(r: dict[str, Any]) -> None:
    m = r["model"]
    print(
        f"what-if  {m['name']}: {m['params'] / 1e9:.2f}B parameters, {m['layers']} layers, "
        f"{m['kv_heads']}/{m['heads']} KV heads x {m['head_dim']}"
    )
    print(
        f"  {r['backend']}, weights {r['quant']}, KV cache {r['kv_type']}, "
        f"{r['ctx_size']} x {r['parallel']} sequences, "
        f"{human_bytes(r['safety_margin_bytes'])} kept free per device"
    )
    if r["message"]:
        print(f"  {r['message']}")
    for d in r["devices"]:
        print(
            f"  {d['kind'].upper()} {d['index']}  {d['name']}: {human_bytes(d['free_bytes'])} "
            f"free of {human_bytes(d['total_bytes'])}, plan {human_bytes(d['planned_bytes'])}"
        )
    print(
        f"  weights {human_bytes(r['weights_bytes'])} + KV {human_bytes(r['kv_bytes'])} "
        f"({human_bytes(int(r['kv_bytes_per_token']))}/token) + activations "
        f"{human_bytes(r['activations_bytes'])} + overhead {human_bytes(r['overhead_bytes'])}"
        f" = {human_bytes(r['total_bytes'])} of {human_bytes(r['available_bytes'])}: "
        f"{'fits' if r['fits'] else 'does NOT fit'}"
    )
    if r["gpu_layers"] is not None:
        print(f"  GPU layers that fit: {r['gpu_layers']} of {r['layers']}")
    print("  max context      " + "".join(f"{kv:>10}" for kv in KV_TYPES))
    rows: dict[str, dict[str, int]] = {}
    for row in r["max_context"]:
        rows.setdefault(row["quant"], {})[row["kv_type"]] = row["max_context"]
    for quant, by_kv in rows.items():
        print(f"    {quant:<14}" + "".join(f"{by_kv[kv]:>10}" for kv in KV_TYPES))
    rec = r["recommendation"]
    print(f"  recommended: weights {rec['quant']}, KV cache {rec['kv_type']}: {rec['reason']}")


def _print(r: dict[str, Any]) -> None:
    gpus = r["gpus"]
    where = (
        "CPU only (no GPU found)"
        if not gpus
        else f"{r['gpu_layers']}/{r['layers'] + 1} layers on {len(gpus)} GPU(s)"
    )
    print(f"{Path(r['model']).name}  ({r['architecture']}, {r['layers']} layers)")
    print(f"  context      {r['ctx_size']} x {r['parallel']} sequences")
    print(f"  weights      {human_bytes(r['weights_bytes'])}")
    print(f"  KV cache     {human_bytes(r['kv_cache_bytes'])}  (f16)")
    print(f"  compute      {human_bytes(r['compute_bytes'])}")
    print(f"  total        {human_bytes(r['total_bytes'])}   {where}")
    for g in gpus:
        print(f"  GPU {g['index']}        {human_bytes(g['free_bytes'])} free  {g['name']}")
    if gpus:
        print(
            f"  on GPUs      {human_bytes(r['vram_bytes'])}, in RAM {human_bytes(r['ram_bytes'])}"
        )
    print(
        f"  free RAM     {human_bytes(r['free_ram_bytes'])} of {human_bytes(r['total_ram_bytes'])}"
    )
    if r["memory_budget_bytes"] is not None:
        print(f"  budget       {human_bytes(r['memory_budget_bytes'])}")
    print(f"  fits         {'yes' if r['fits'] else 'NO'}")
    sizes = ", ".join(f"{k} {v}" for k, v in r["max_context_per_sequence"].items())
    print(f"  max context per sequence: {sizes}")
