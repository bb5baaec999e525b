"""`xllm benchmark`'s four outputs: a text table, JSON, a Markdown table, Prometheus text.

Text and Markdown share one set of columns; the Prometheus exposition is written by
`prometheus_client` from gauges, one sample per cell (and per quantile for the latencies).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from xllm.cli.humanize import table

COLUMNS = (
    "CONCURRENCY",
    "PROMPT",
    "GEN",
    "REQUESTS",
    "PROMPT TOK/S",
    "GEN TOK/S",
    "TOTAL TOK/S",
    "TTFT P50/P90/P99 MS",
    "ITL P50/P90/P99 MS",
    "E2E P50/P90/P99 MS",
)


def document(model: str, base_url: str, requests: int, cells: list[dict[str, Any]]) -> Any:
    """The JSON document: the run's settings and one summary per cell."""
    return {"model": model, "server": base_url, "requests_per_client": requests, "results": cells}


def as_json(doc: Any) -> str:
    return json.dumps(doc, indent=2)


def _ms(q: dict[str, float]) -> str:
    return "/".join(f"{q[k]:.1f}" for k in ("p50", "p90", "p99"))


def _row(c: dict[str, Any]) -> list[str]:
    return [
        str(c["concurrency"]),
        str(c["prompt_tokens"]),
        str(c["gen_tokens"]),
        str(c["requests"]),
        f"{c['prompt_tokens_per_second']:.1f}",
        f"{c['generation_tokens_per_second']:.1f}",
        f"{c['tokens_per_second']:.1f}",
        _ms(c["ttft_ms"]),
        _ms(c["itl_ms"]),
        _ms(c["e2e_ms"]),
    ]


def _caption(doc: Any) -> str:
    return (
        f"{doc['model']} at {doc['server']}: prompt and generation lengths in tokens as asked; "
        f"{doc['requests_per_client']} request(s) per concurrent client"
    )


def as_text(doc: Any) -> str:
    rows = [list(COLUMNS)] + [_row(c) for c in doc["results"]]
    return _caption(doc) + "\n\n" + table(rows)


def as_markdown(doc: Any) -> str:
    lines = [f"| {' | '.join(COLUMNS)} |", "|" + "---:|" * len(COLUMNS)]
    lines += [f"| {' | '.join(_row(c))} |" for c in doc["results"]]
    return f"**{_caption(doc)}**\n\n" + "\n".join(lines)


_LABELS = ["model", "concurrency", "prompt_tokens", "gen_tokens"]

# summary key -> (metric name, help); rates and counts, one sample per cell
_GAUGES = {
    "prompt_tokens_per_second": (
        "xllm_benchmark_prompt_tokens_per_second",
        "Prompt tokens per second of a request (prompt tokens / TTFT), median",
    ),
    "generation_tokens_per_second": (
        "xllm_benchmark_generation_tokens_per_second",
        "Generated tokens per second, all concurrent streams together",
    ),
    "tokens_per_second": (
        "xllm_benchmark_tokens_per_second",
        "Prompt and generated tokens per second, all concurrent streams together",
    ),
    "requests_per_second": ("xllm_benchmark_requests_per_second", "Requests completed per second"),
    "requests": ("xllm_benchmark_requests", "Requests measured"),
    "duration_s": ("xllm_benchmark_duration_seconds", "Wall time of the measurement"),
    "generated_tokens_total": ("xllm_benchmark_generated_tokens", "Tokens generated"),
    "prompt_tokens_total": ("xllm_benchmark_prompt_tokens", "Prompt tokens sent"),
}
# summary key -> (metric name, help); milliseconds in the summary, seconds in Prometheus
_LATENCIES = {
    "ttft_ms": ("xllm_benchmark_time_to_first_token_seconds", "Time to first token"),
    "itl_ms": ("xllm_benchmark_inter_token_latency_seconds", "Time between streamed tokens"),
    "e2e_ms": ("xllm_benchmark_request_latency_seconds", "Time from request to last token"),
}


class _Results(Collector):
    def __init__(self, doc: Any) -> None:
        self._doc = doc

    def collect(self) -> Iterator[Metric]:
        cells = self._doc["results"]
        labels = [
            [
                self._doc["model"],
                str(c["concurrency"]),
                str(c["prompt_tokens"]),
                str(c["gen_tokens"]),
            ]
            for c in cells
        ]
        for key, (name, doc) in _GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=_LABELS)
            for cell, values in zip(cells, labels, strict=True):
                family.add_metric(values, float(cell[key]))
            yield family
        for key, (name, doc) in _LATENCIES.items():
            family = GaugeMetricFamily(name, doc, labels=[*_LABELS, "quantile"])
            for cell, values in zip(cells, labels, strict=True):
                for q, ms in cell[key].items():
                    family.add_metric([*values, str(int(q[1:]) / 100)], ms / 1000)
            yield family


def as_prometheus(doc: Any) -> str:
    registry = CollectorRegistry()
    registry.register(_Results(doc))
    return generate_latest(registry).decode()
