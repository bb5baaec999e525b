"""Prometheus metrics (prefix `xllm_`), from the real counters.

Request counts and latency histograms are recorded as things happen; token counters, queue
depth, running sequences and cache hits are read from each model's Rust engine at scrape time,
so they cannot drift from what the engine did.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xllm.memory import probe

if TYPE_CHECKING:
    from xllm.server.response_cache import ResponseCache

# `_created` samples double the output for nothing a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)

# engine stats key -> (metric name, help, counter?)
_ENGINE_STATS: dict[str, tuple[str, str, bool]] = {
    "requests_total": ("engine_requests", "Generations the engine accepted", True),
    "tokens_prompt_total": ("prompt_tokens", "Prompt tokens processed or reused", True),
    "tokens_cached_total": ("prefix_cache_hit_tokens", "Prompt tokens served from cache", True),
    "tokens_generated_total": ("generated_tokens", "Tokens generated", True),
    "decode_steps_total": ("decode_steps", "llama_decode calls of the batching loop", True),
    "images_encoded_total": ("images_encoded", "Images a vision projector encoded", True),
    "images_preprocessed_total": (
        "images_preprocessed",
        "Images libmtmd resized and normalised (once per image when its encode follows)",
        True,
    ),
    "spec_drafted_tokens_total": ("spec_drafted_tokens", "Draft tokens verified", True),
    "spec_accepted_tokens_total": (
        "spec_accepted_tokens",
        "Draft tokens the model generated too (speculation)",
        True,
    ),
    "spec_declined_tokens_total": (
        "spec_declined_tokens",
        "Tokens auto mode's lookup guessed that the cost model did not verify (a draft would "
        "not pay)",
        True,
    ),
    "lora_switches_total": (
        "lora_switches",
        "Times the LoRA adapters changed between decode steps (adapter groups taking turns)",
        True,
    ),
    "kv_disk_saves_total": ("kv_disk_saves", "Sequences' KV state saved on disk", True),
    "kv_disk_restores_total": ("kv_disk_restores", "Prompts that went on from saved KV", True),
    "kv_disk_restored_tokens_total": (
        "kv_disk_restored_tokens",
        "Prompt tokens restored from disk instead of prefilled",
        True,
    ),
    "kv_disk_bytes": ("kv_disk_bytes", "Bytes of KV state saved on disk", False),
    "images_generated_total": ("images_generated", "Images a diffusion model made", True),
    "diffusion_steps_total": ("diffusion_steps", "Denoising steps of image generations", True),
    "diffusion_step": ("diffusion_step", "The running image generation's step (0: none)", False),
    "diffusion_steps": (
        "diffusion_steps_planned",
        "Steps the running image generation takes",
        False,
    ),
    "queue_depth": ("queue_depth", "Requests waiting for a free sequence", False),
    "running": ("running_sequences", "Sequences being decoded", False),
}


class _EngineCollector(Collector):
    def __init__(self, models: Callable[[], Mapping[str, Any]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        models = self._models()
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        for key, (name, doc, counter) in _ENGINE_STATS.items():
            cls = CounterMetricFamily if counter else GaugeMetricFamily
            families[key] = cls(f"xllm_{name}", doc, labels=["model"])
        loaded = GaugeMetricFamily("xllm_loaded_models", "Models loaded now")
        loaded.add_metric([], len(models))
        ram = GaugeMetricFamily(
            "xllm_model_ram_bytes", "Host memory of a model (weights, KV cache)", labels=["model"]
        )
        vram = GaugeMetricFamily(
            "xllm_model_vram_bytes", "GPU memory of a model (offloaded layers)", labels=["model"]
        )
        for name, model in models.items():
            stats = model.stats()
            for key, family in families.items():
                if key in stats:
                    family.add_metric([name], float(stats[key]))
            plan = model.plan  # the memory plan it was loaded with
            ram.add_metric([name], float(plan.ram if plan else model.info.size))
            vram.add_metric([name], float(plan.vram if plan else 0))
        yield from families.values()
        yield from (loaded, ram, vram)
        rss = GaugeMetricFamily("xllm_process_ram_bytes", "Resident memory of the server")
        rss.add_metric([], float(_rss_bytes()))
        total, free = probe.ram()
        host = GaugeMetricFamily("xllm_ram_bytes", "Host RAM", labels=["kind"])
        host.add_metric(["total"], float(total))
        host.add_metric(["free"], float(free))
        gpu = GaugeMetricFamily("xllm_gpu_vram_bytes", "GPU memory", labels=["gpu", "kind"])
        for g in probe.gpus():
            gpu.add_metric([str(g.index), "total"], float(g.total_bytes))
            gpu.add_metric([str(g.index), "free"], float(g.free_bytes))
        yield from (rss, host, gpu)


class _UpstreamCollector(Collector):
    """Each remote endpoint's base URLs: up, outstanding, and requests, errors and time."""

    def __init__(self, pools: Callable[[], Mapping[str, Any]]) -> None:
        self._pools = pools

    def collect(self) -> Iterator[Metric]:
        labels = ["endpoint", "upstream"]
        up = GaugeMetricFamily(
            "xllm_upstream_up", "1 if the upstream passed its health check", labels=labels
        )
        out = GaugeMetricFamily(
            "xllm_upstream_outstanding", "Requests on the upstream now", labels=labels
        )
        health = GaugeMetricFamily(
            "xllm_upstream_health_latency_seconds", "Last health check's round trip", labels=labels
        )
        requests = CounterMetricFamily(
            "xllm_upstream_requests", "Requests sent to the upstream", labels=labels
        )
        errors = CounterMetricFamily(
            "xllm_upstream_errors",
            "Requests the upstream failed (unreachable, 5xx, timeout, broken stream)",
            labels=labels,
        )
        seconds = CounterMetricFamily(
            "xllm_upstream_request_seconds",
            "Time requests spent on the upstream, all together (divide by requests for the mean)",
            labels=labels,
        )
        for pool in self._pools().values():
            for u in pool.upstreams:
                key = [pool.name, u.url]
                up.add_metric(key, float(u.state == "up"))
                out.add_metric(key, float(u.outstanding))
                if u.latency_ms is not None:
                    health.add_metric(key, u.latency_ms / 1000)
                requests.add_metric(key, float(u.requests))
                errors.add_metric(key, float(u.errors))
                seconds.add_metric(key, u.seconds)
        yield from (up, out, health, requests, errors, seconds)


@dataclass(frozen=True)
class Routing:
    """What a balancer routes on, as /v0/health has it."""

    free_slots: Mapping[str, int]
    """Sequences free now, by local model instance (a remote model's slots are its upstream's)."""
    headroom_bytes: int
    """Room for another model: the memory budget minus loaded models' plans, or free RAM."""


class _RoutingCollector(Collector):
    def __init__(self, routing: Callable[[], Routing]) -> None:
        self._routing = routing

    def collect(self) -> Iterator[Metric]:
        routing = self._routing()
        free = GaugeMetricFamily(
            "xllm_free_slots", "Sequences free now (local models)", labels=["model"]
        )
        for name, n in routing.free_slots.items():
            free.add_metric([name], float(n))
        headroom = GaugeMetricFamily(
            "xllm_memory_headroom_bytes",
            "Room for another model: the memory budget minus loaded models' plans, or free RAM",
        )
        headroom.add_metric([], float(routing.headroom_bytes))
        yield from (free, headroom)


class _ResponseCacheCollector(Collector):
    """The temperature-0 response cache's hits, misses and size, read at scrape time."""

    def __init__(self, cache: ResponseCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        c = self._cache
        hits = CounterMetricFamily(
            "xllm_response_cache_hits", "Greedy requests answered from the response cache"
        )
        hits.add_metric([], float(c.hits))
        misses = CounterMetricFamily(
            "xllm_response_cache_misses", "Greedy requests the response cache did not hold"
        )
        misses.add_metric([], float(c.misses))
        size = GaugeMetricFamily("xllm_response_cache_bytes", "Bytes the response cache holds")
        size.add_metric([], float(c.bytes))
        yield from (hits, misses, size)


def _rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: peak instead of current
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Metrics:
    """One server's metrics; a registry of its own keeps in-process test servers apart."""

    def __init__(
        self,
        models: Callable[[], Mapping[str, Any]],
        pools: Callable[[], Mapping[str, Any]],
        routing: Callable[[], Routing],
        response_cache: ResponseCache | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "xllm_requests",
            "HTTP requests by endpoint, model and status",
            ["endpoint", "model", "status"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "xllm_time_to_first_token_seconds",
            "Time from admission to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.itl = Histogram(
            "xllm_inter_token_latency_seconds",
            "Mean time between generated tokens, per request",
            ["model"],
            buckets=_TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.finished = Counter(
            "xllm_generations",
            "Finished generations (choices) by finish reason",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "xllm_model_load_seconds",
            "Time to load a model",
            ["model"],
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.audio_synthesized = Counter(
            "xllm_audio_synthesized_seconds",
            "Seconds of audio synthesized (text to speech)",
            ["model"],
            registry=self.registry,
        )
        self.synthesis_rtf = Histogram(
            "xllm_synthesis_real_time_factor",
            "Synthesis time over the audio's duration, per request (below 1: faster than "
            "real time)",
            ["model"],
            buckets=_RTF_BUCKETS,
            registry=self.registry,
        )
        self.audio_transcribed = Counter(
            "xllm_audio_transcribed_seconds",
            "Seconds of audio transcribed or translated",
            ["model"],
            registry=self.registry,
        )
        self.transcription_rtf = Histogram(
            "xllm_transcription_real_time_factor",
            "Processing time over audio duration, per transcription (below 1: faster than "
            "real time)",
            ["model"],
            buckets=_RTF_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(models))
        self.registry.register(_UpstreamCollector(pools))
        self.registry.register(_RoutingCollector(routing))
        if response_cache is not None:
            self.registry.register(_ResponseCacheCollector(response_cache))

    def observe_finish(self, model: str, finish: str, extra: Mapping[str, Any]) -> None:
        self.finished.labels(model, finish).inc()
        ttft = extra.get("ttft_ms")
        if ttft is not None and extra.get("completion_tokens"):
            self.ttft.labels(model).observe(float(ttft) / 1000)
        tokens = int(extra.get("completion_tokens", 0))
        if tokens > 1 and extra.get("gen_ms") is not None:
            self.itl.labels(model).observe(float(extra["gen_ms"]) / 1000 / (tokens - 1))

    def observe_transcription(self, model: str, audio_s: float, processing_s: float) -> None:
        self.audio_transcribed.labels(model).inc(audio_s)
        if audio_s > 0:
            self.transcription_rtf.labels(model).observe(processing_s / audio_s)

    def observe_synthesis(self, model: str, audio_s: float, processing_s: float) -> None:
        self.audio_synthesized.labels(model).inc(audio_s)
        if audio_s > 0:
            self.synthesis_rtf.labels(model).observe(processing_s / audio_s)

    def observe_load(self, model: str, seconds: float) -> None:
        self.load_seconds.labels(model).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
