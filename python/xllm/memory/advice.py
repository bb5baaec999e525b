"""The plan behind `POST /v0/plan`, the planner page and `xllm plan`: a model (stored, a GGUF
file, a Hub repo or typed-in numbers) against the chosen GPUs (or RAM without one), the
largest context per quantization x KV cache type, and the setting to use.

Each device keeps `safety_margin_mb` free; the model is split across GPUs in proportion to
what each has left, so the GPUs' room pools (as llama.cpp's layer split does).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from xllm.config import Settings
from xllm.errors import InvalidRequest, ModelNotFound
from xllm.memory import probe, shape, sizing
from xllm.memory.planner import KV_TYPE_BYTES
from xllm.memory.sizing import BITS, FILE, KV_TYPES, Model, Setting

MB = 1000 * 1000
MiB = 1024 * 1024
NO_GPU = "no NVIDIA GPU found (NVML: no driver or no GPU): planning for CPU and RAM"
CHART_POINTS = 64

_Count = Annotated[int, Field(gt=0, le=1_000_000)]
Quant = Literal["gguf", "fp32", "fp16", "bf16", "int8", "int4", "q8_0", "q6_k", "q5_k", "q5_0",
                "q4_k", "q4_0", "q3_k", "q2_k"]  # fmt: skip


class PlanRequest(BaseModel):
    """One model source (`model`, `hf`, or `params` with `layers`, `hidden_size` and `heads`)
    and the setting to plan for."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    """A stored model (over HTTP), or also a GGUF file (`xllm plan`)."""
    hf: Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+$", max_length=200)] | None = None
    """A Hugging Face repo id: its config.json gives the shape."""
    params: Annotated[float, Field(gt=0, le=1e13)] | None = None
    layers: Annotated[int, Field(gt=0, le=10_000)] | None = None
    hidden_size: _Count | None = None
    heads: Annotated[int, Field(gt=0, le=10_000)] | None = None
    kv_heads: Annotated[int, Field(gt=0, le=10_000)] | None = None
    head_dim: Annotated[int, Field(gt=0, le=100_000)] | None = None
    vocab: Annotated[int, Field(gt=0, le=10_000_000)] | None = None
    context_length: Annotated[int, Field(gt=0, le=100_000_000)] | None = None
    quant: Quant | None = None
    """Weights: `gguf` (the file's own), FP/INT or a GGUF type; default the file's, else fp16."""
    kv_type: Literal["f16", "q8_0", "q4_0"] = "f16"
    ctx_size: Annotated[int, Field(gt=0, le=sizing.MAX_SEARCH)] = 4096
    parallel: Annotated[int, Field(gt=0, le=1024)] = 1
    batch_size: Annotated[int, Field(gt=0, le=65536)] = 512
    safety_margin_mb: Annotated[float, Field(ge=0, le=1e7)] = 500
    backend: Literal["llama.cpp", "vllm", "autogptq", "transformers"] = "llama.cpp"
    gpu_memory_utilization: Annotated[float, Field(gt=0, le=1)] = 0.9
    gpus: Annotated[list[Annotated[int, Field(ge=0, le=1023)]], Field(max_length=64)] | None = None
    """GPU indices to use (default: all)."""
    vram_mb: Annotated[list[Annotated[float, Field(gt=0, le=1e9)]], Field(max_length=64)] | None = (
        None
    )
    """What-if: plan for GPUs with this much free memory each, instead of the ones here."""


@dataclass(frozen=True)
class Device:
    kind: Literal["gpu", "cpu"]
    index: int
    name: str
    total: int
    free: int

    def usable(self, req: PlanRequest) -> int:
        """What the backend may take of it: vLLM claims a share of the whole GPU."""
        if req.backend == "vllm" and self.kind == "gpu":
            return min(self.free, int(self.total * req.gpu_memory_utilization))
        return self.free


MANUAL = ("params", "layers", "hidden_size", "heads")


def resolve(settings: Settings, req: PlanRequest, files_allowed: bool) -> Model:
    """The model the request names; 400/404 naming the field when it cannot be had."""
    sources = [n for n in ("model", "hf", "params") if getattr(req, n) is not None]
    if len(sources) != 1:
        raise InvalidRequest(
            "give one model: `model`, `hf`, or `params` with `layers`, `hidden_size`, `heads`",
            param=sources[1] if len(sources) > 1 else "model",
        )
    if req.model is not None:
        return _local(settings, req.model, files_allowed)
    if req.hf is not None:
        from xllm.models.hub import config_json

        return Model(f"hf.co/{req.hf}", shape.from_hf_config(config_json(settings, req.hf)))
    missing = [n for n in MANUAL if getattr(req, n) is None]
    if missing:
        raise InvalidRequest(f"{missing[0]}: required with `params`", param=missing[0])
    assert req.params is not None and req.layers and req.hidden_size and req.heads
    kv_heads = req.kv_heads or req.heads
    if kv_heads > req.heads:
        raise InvalidRequest("kv_heads: more KV heads than heads", param="kv_heads")
    return Model(
        "manual",
        shape.Shape(
            params=int(req.params),
            layers=req.layers,
            hidden_size=req.hidden_size,
            heads=req.heads,
            kv_heads=kv_heads,
            head_dim=req.head_dim or max(req.hidden_size // req.heads, 1),
            vocab=req.vocab or 32000,
            context_length=req.context_length,
        ),
    )


def _local(settings: Settings, name: str, files_allowed: bool) -> Model:
    from xllm.models import gguf, names
    from xllm.models.store import Store

    path = Path(name)
    if files_allowed and path.is_file():
        g = gguf.read_model(gguf.model_files(path))
        return Model(str(path), shape.from_gguf(g), g)
    store = Store(settings.models_dir)
    stored = store.get(names.parse_name(name))
    if stored is not None and stored.format == "safetensors":
        config = store.blob_path(dict(stored.named_files)["config.json"])
        return Model(name, shape.from_hf_config(json.loads(config.read_bytes()), name))
    found = stored.files if stored is not None else None
    bundled = names.bundled_path(names.canonical(name)) if files_allowed else None
    if found is None and bundled is not None:
        found = [bundled]
    if found is None:
        raise ModelNotFound(f"model {name!r} not found", param="model")
    g = gguf.read_model(found)
    return Model(name, shape.from_gguf(g), g)


def devices(req: PlanRequest) -> tuple[list[Device], str | None]:
    """The GPUs to plan for (what-if amounts, or NVML's, filtered by `gpus`), else RAM."""
    if req.vram_mb is not None:
        return [
            Device("gpu", i, f"what-if GPU {i}", int(mb * MB), int(mb * MB))
            for i, mb in enumerate(req.vram_mb)
        ], None
    found = probe.gpus()
    if found and req.gpus is not None:
        unknown = [i for i in req.gpus if i not in {g.index for g in found}]
        if unknown:
            raise InvalidRequest(f"gpus: no GPU {unknown[0]} on this machine", param="gpus")
        found = [g for g in found if g.index in req.gpus]
    if found:
        return [Device("gpu", g.index, g.name, g.total_bytes, g.free_bytes) for g in found], None
    total, free = probe.ram()
    return [Device("cpu", 0, "RAM", total, free)], NO_GPU


def plan(settings: Settings, req: PlanRequest, files_allowed: bool = False) -> dict[str, Any]:
    """The whole report (JSON-ready)."""
    model = resolve(settings, req, files_allowed)
    devs, message = devices(req)
    if model.gguf is None and req.quant == FILE:
        raise InvalidRequest("quant: `gguf` needs a GGUF model", param="quant")
    allowed = sizing.BACKENDS[req.backend].quants
    quant: str = req.quant or model.quants(req.backend)[0]
    if quant not in allowed:
        raise InvalidRequest(
            f"quant: {req.backend} does not run {quant} weights "
            f"(it runs {', '.join(sorted(allowed - {FILE}))})",
            param="quant",
        )
    margin = int(req.safety_margin_mb * MB)
    rooms = [max(d.usable(req) - margin, 0) for d in devs]
    available = sum(rooms)
    on_cpu = devs[0].kind == "cpu"
    setting = Setting(quant, req.kv_type, req.parallel, req.batch_size, req.backend, on_cpu)
    f = sizing.footprint(model, setting, req.ctx_size)
    fits = f.total <= available
    table = _max_contexts(model, setting, available)
    gpu_layers = (
        None if fits or on_cpu else sizing.layers_that_fit(model, setting, req.ctx_size, available)
    )
    return {
        "model": {"name": model.label, **model.shape.as_dict()},
        "backend": req.backend,
        "quant": quant,
        "kv_type": req.kv_type,
        "ctx_size": req.ctx_size,
        "parallel": req.parallel,
        "safety_margin_bytes": margin,
        "devices": _devices(devs, rooms, f.total, margin),
        "message": message,
        "weights_bytes": f.weights,
        "kv_bytes_per_token": model.shape.kv_bytes_per_token(KV_TYPE_BYTES[req.kv_type])
        * req.parallel,
        "kv_bytes": f.kv,
        "activations_bytes": f.activations,
        "overhead_bytes": f.overhead,
        "total_bytes": f.total,
        "available_bytes": available,
        "fits": fits,
        "layers": model.shape.layers,
        "gpu_layers": gpu_layers,
        "max_context": table,
        "recommendation": _recommend(model, table, req.ctx_size, gpu_layers),
        "chart": _chart(model, setting, table, available),
    }


def _devices(devs: list[Device], rooms: list[int], total: int, margin: int) -> list[Any]:
    """Each device's share of the plan: in proportion to its room."""
    whole = sum(rooms)
    out = []
    for d, room in zip(devs, rooms, strict=True):
        share = int(total * room / whole) if whole else total
        out.append({
            "kind": d.kind, "index": d.index, "name": d.name, "total_bytes": d.total,
            "used_bytes": d.total - d.free, "free_bytes": d.free, "planned_bytes": share,
            "fits": share + margin <= d.free,
        })  # fmt: skip
    return out


def _max_contexts(model: Model, s: Setting, available: int) -> list[dict[str, Any]]:
    rows = []
    for quant in model.quants(s.backend):
        for kv in KV_TYPES:
            found = sizing.max_context(model, replace(s, quant=quant, kv_type=kv), available)
            rows.append({
                "quant": quant, "kv_type": kv, "max_context": found,
                "bits_per_weight": round(_bits(model, quant), 2),
                "limited_by_model": found == model.search_limit
                and model.search_limit < sizing.MAX_SEARCH,
            })  # fmt: skip
    return rows


def _bits(model: Model, quant: str) -> float:
    if quant != FILE:
        return BITS[quant]
    assert model.gguf is not None
    weights = sizing.footprint(model, Setting(FILE, "f16", 1, 1, "llama.cpp"), 1).weights
    return weights * 8 / max(model.shape.params, 1)


def _recommend(
    model: Model, table: list[dict[str, Any]], wanted: int, gpu_layers: int | None
) -> dict[str, Any]:
    """The best-quality weights, then KV cache, that reach the wanted context."""
    quality = sorted(table, key=lambda r: (-r["bits_per_weight"], -KV_TYPE_BYTES[r["kv_type"]]))
    enough = [r for r in quality if r["max_context"] >= min(wanted, model.search_limit)]
    if enough:
        best = enough[0]
        better = quality.index(best)
        reason = (
            f"the best quality that fits {wanted} tokens per sequence (up to "
            f"{best['max_context']})"
            + (f"; {better} higher-quality settings do not fit" if better else "")
        )
    else:
        best = max(quality, key=lambda r: r["max_context"])
        reason = f"nothing fits {wanted} tokens; this setting reaches the most context"
        if best["max_context"] == 0:
            reason = "the model does not fit at any context"
        if gpu_layers is not None:
            reason += f"; or offload {gpu_layers} of {model.shape.layers} layers to the GPUs"
    return {"quant": best["quant"], "kv_type": best["kv_type"],
            "max_context": best["max_context"], "reason": reason}  # fmt: skip


def _chart(model: Model, s: Setting, table: list[dict[str, Any]], available: int) -> dict[str, Any]:
    """Memory vs context for each quantization (at the requested KV type), sampled evenly up
    to a bit past the largest max context."""
    same_kv = [r for r in table if r["kv_type"] == s.kv_type]
    top = max([r["max_context"] for r in same_kv] + [s.parallel, 1024])
    end = min(model.search_limit, max(int(top * 1.25), 16))
    xs = sorted({max(1, end * i // (CHART_POINTS - 1)) for i in range(CHART_POINTS)})
    series = []
    for r in same_kv:
        q = replace(s, quant=r["quant"])
        series.append({
            "quant": r["quant"], "max_context": r["max_context"],
            "bytes": [sizing.footprint(model, q, x).total for x in xs],
        })  # fmt: skip
    return {"contexts": xs, "kv_type": s.kv_type, "available_bytes": available,
            "series": series}  # fmt: skip
