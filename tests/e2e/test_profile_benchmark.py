"""`xllm profile` and `xllm benchmark` against a real server, as a user runs them: every output
format parses, and the figures are positive and agree with each other."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, free_port

MODEL = "smollm2:135m"
# Tiny runs: two concurrencies, one request per client, short prompts and answers.
BENCH = ["--concurrency", "1,2", "--prompt-tokens", "24", "--gen-tokens", "8", "--requests", "1"]
CELLS = {1: 1, 2: 2}  # concurrency -> requests in the cell (one per client)

NUMBER = {"type": "number", "exclusiveMinimum": 0}
COUNT = {"type": "integer", "minimum": 1}
QUANTILES = {
    "type": "object",
    "properties": {"p50": NUMBER, "p90": NUMBER, "p99": NUMBER},
    "required": ["p50", "p90", "p99"],
    "additionalProperties": False,
}
PROFILE_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"const": MODEL},
        "server": {"type": "string", "pattern": "^http://127\\.0\\.0\\.1:\\d+$"},
        "load_s": NUMBER,
        "ram_planned_bytes": COUNT,
        "ram_measured_bytes": COUNT,
        "vram_planned_bytes": {"type": "integer", "minimum": 0},
        "vram_measured_bytes": {"type": "integer"},
        "gpu_layers": {"type": "integer", "minimum": 0},
        "context_length": COUNT,
        "ttft_ms": NUMBER,
        "ttft_prompt_tokens": COUNT,
        "prompt_tokens": COUNT,
        "prompt_s": NUMBER,
        "prompt_tokens_per_second": NUMBER,
        "generated_tokens": COUNT,
        "generation_s": NUMBER,
        "generation_tokens_per_second": NUMBER,
    },
    "required": [
        "model", "server", "load_s", "ram_planned_bytes", "ram_measured_bytes",
        "vram_planned_bytes", "vram_measured_bytes", "gpu_layers", "context_length", "ttft_ms",
        "ttft_prompt_tokens", "prompt_tokens", "prompt_s", "prompt_tokens_per_second",
        "generated_tokens", "generation_s", "generation_tokens_per_second",
    ],
    "additionalProperties": False,
}  # fmt: skip
CELL_SCHEMA = {
    "type": "object",
    "properties": {
        "concurrency": COUNT,
        "prompt_tokens": COUNT,
        "gen_tokens": COUNT,
        "requests": COUNT,
        "duration_s": NUMBER,
        "prompt_tokens_total": COUNT,
        "cached_tokens_total": {"type": "integer", "minimum": 0},
        "generated_tokens_total": COUNT,
        "requests_per_second": NUMBER,
        "generation_tokens_per_second": NUMBER,
        "tokens_per_second": NUMBER,
        "prompt_tokens_per_second": NUMBER,
        "stream_tokens_per_second": NUMBER,
        "ttft_ms": QUANTILES,
        "itl_ms": QUANTILES,
        "e2e_ms": QUANTILES,
    },
    "required": [
        "concurrency", "prompt_tokens", "gen_tokens", "requests", "duration_s",
        "prompt_tokens_total", "cached_tokens_total", "generated_tokens_total",
        "requests_per_second", "generation_tokens_per_second", "tokens_per_second",
        "prompt_tokens_per_second", "stream_tokens_per_second", "ttft_ms", "itl_ms", "e2e_ms",
    ],
    "additionalProperties": False,
}  # fmt: skip
BENCH_SCHEMA = {
    "type": "object",
    "properties": {
        "model": {"const": MODEL},
        "server": {"type": "string"},
        "requests_per_client": {"const": 1},
        "results": {"type": "array", "items": CELL_SCHEMA, "minItems": 2, "maxItems": 2},
    },
    "required": ["model", "server", "requests_per_client", "results"],
    "additionalProperties": False,
}


def xllm(port: int, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{port}"}
    return subprocess.run(
        [sys.executable, "-m", "xllm", *args], capture_output=True, text=True, env=env, timeout=300
    )


def near(a: float, b: float, tolerance: float = 0.1) -> bool:
    return abs(a - b) <= tolerance * max(abs(a), abs(b))


def test_profile_json(server: Server) -> None:
    r = xllm(server.port, "profile", MODEL, "--prompt-tokens", "48", "--gen-tokens", "8", "--json")
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)
    jsonschema.validate(p, PROFILE_SCHEMA)
    assert p["prompt_tokens"] >= 48  # the server may add a BOS
    assert p["generated_tokens"] == 8  # ignore_eos: exactly what was asked
    assert near(p["prompt_tokens_per_second"] * p["prompt_s"], p["prompt_tokens"])
    # The generation rate counts the tokens after the first, over the time they took.
    assert near(p["generation_tokens_per_second"] * p["generation_s"], p["generated_tokens"] - 1)
    assert p["context_length"] == 1024
    # Measured resident memory of the runner holds at least the mapped weights' pages in use
    # and is of the order of the plan.
    assert p["ram_planned_bytes"] / 10 < p["ram_measured_bytes"] < p["ram_planned_bytes"] * 10
    assert r.stderr.startswith(f"profiling {MODEL}")


def test_profile_text(server: Server) -> None:
    r = xllm(server.port, "profile", MODEL, "--prompt-tokens", "32", "--gen-tokens", "8")
    assert r.returncode == 0, r.stderr
    rows = {line[:22].strip(): line[22:].strip() for line in r.stdout.splitlines()}
    assert list(rows) == [
        "model", "load time", "RAM planned", "RAM measured", "VRAM planned", "VRAM measured",
        "time to first token", "prompt", "generation",
    ]  # fmt: skip
    assert rows["model"] == MODEL
    assert rows["load time"].endswith(" s") and float(rows["load time"][:-2]) > 0
    assert rows["RAM measured"].endswith("MB (runner resident memory)")
    assert rows["generation"].split()[1] == "tokens/s" and float(rows["generation"].split()[0]) > 0


def _bench(server: Server, *fmt: str) -> subprocess.CompletedProcess[str]:
    r = xllm(server.port, "benchmark", MODEL, *BENCH, *fmt)
    assert r.returncode == 0, r.stderr
    return r


def test_benchmark_json(server: Server) -> None:
    r = _bench(server, "--json")
    doc = json.loads(r.stdout)
    jsonschema.validate(doc, BENCH_SCHEMA)
    assert [c["concurrency"] for c in doc["results"]] == [1, 2]
    for c in doc["results"]:
        assert c["requests"] == CELLS[c["concurrency"]]
        assert (c["prompt_tokens"], c["gen_tokens"]) == (24, 8)
        assert c["generated_tokens_total"] == 8 * c["requests"]  # ignore_eos: exact lengths
        assert 24 * c["requests"] <= c["prompt_tokens_total"] <= 25 * c["requests"]
        # Each prompt is new: nothing comes from cache beyond, by chance, the first token or two
        # it shares with an earlier prompt (two tokens: ~1/84² per earlier prompt on SmolLM2;
        # three: ~1/84³).
        assert c["cached_tokens_total"] <= 2 * c["requests"]
        d = c["duration_s"]
        assert near(c["generation_tokens_per_second"] * d, c["generated_tokens_total"])
        total = c["prompt_tokens_total"] + c["generated_tokens_total"]
        assert near(c["tokens_per_second"] * d, total)
        assert near(c["requests_per_second"] * d, c["requests"])
        for q in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert c[q]["p50"] <= c[q]["p90"] <= c[q]["p99"]
        assert c["ttft_ms"]["p99"] <= c["e2e_ms"]["p99"]
        assert c["e2e_ms"]["p99"] <= d * 1000
    # The progress display goes to stderr, one bar per cell.
    assert "benchmarking smollm2:135m: 3 requests" in r.stderr
    assert "c=2 prompt=24 gen=8: 100%" in r.stderr


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_benchmark_markdown_report(server: Server) -> None:
    lines = [x for x in _bench(server, "--report").stdout.splitlines() if x.startswith("|")]
    header, rule, *rows = lines
    columns = _cells(header)
    assert columns[:4] == ["CONCURRENCY", "PROMPT", "GEN", "REQUESTS"]
    assert all(set(c) <= set("-:") and c for c in _cells(rule))
    assert len(rows) == 2
    for row in rows:
        cell = dict(zip(columns, _cells(row), strict=True))
        assert cell["REQUESTS"] == str(CELLS[int(cell["CONCURRENCY"])])
        assert float(cell["GEN TOK/S"]) > 0 and float(cell["PROMPT TOK/S"]) > 0
        for key in ("TTFT P50/P90/P99 MS", "ITL P50/P90/P99 MS", "E2E P50/P90/P99 MS"):
            p50, p90, p99 = (float(v) for v in cell[key].split("/"))
            assert 0 < p50 <= p90 <= p99


def test_benchmark_prometheus(server: Server) -> None:
    text = _bench(server, "--prometheus").stdout
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gen = families["xllm_benchmark_generation_tokens_per_second"]
    assert gen.type == "gauge"
    by_c = {s.labels["concurrency"]: s for s in gen.samples}
    assert set(by_c) == {"1", "2"}
    assert by_c["2"].labels == {
        "model": MODEL, "concurrency": "2", "prompt_tokens": "24", "gen_tokens": "8"
    }  # fmt: skip
    requests = {
        s.labels["concurrency"]: s.value for s in families["xllm_benchmark_requests"].samples
    }
    assert requests == {"1": 1.0, "2": 2.0}
    durations = {
        s.labels["concurrency"]: s.value
        for s in families["xllm_benchmark_duration_seconds"].samples
    }
    for s in families["xllm_benchmark_generated_tokens"].samples:
        c = s.labels["concurrency"]
        assert s.value == 8 * requests[c]
        assert near(by_c[c].value * durations[c], s.value)
    for name in (
        "xllm_benchmark_time_to_first_token_seconds",
        "xllm_benchmark_inter_token_latency_seconds",
        "xllm_benchmark_request_latency_seconds",
    ):
        for c in ("1", "2"):
            q = {s.labels["quantile"]: s.value for s in families[name].samples
                 if s.labels["concurrency"] == c}  # fmt: skip
            assert list(q) == ["0.5", "0.9", "0.99"]
            assert 0 < q["0.5"] <= q["0.9"] <= q["0.99"] < 60


def test_benchmark_text(server: Server) -> None:
    lines = _bench(server).stdout.splitlines()
    assert lines[0].startswith(f"{MODEL} at http://127.0.0.1:{server.port}")
    header = lines[2].split()
    assert header[:4] == ["CONCURRENCY", "PROMPT", "GEN", "REQUESTS"]
    rows = [line.split() for line in lines[3:]]
    assert [(r[0], r[3]) for r in rows] == [("1", "1"), ("2", "2")]


@pytest.mark.parametrize(
    "args", [["profile", "no-such-model:1b"], ["benchmark", "no-such-model:1b", *BENCH]]
)
def test_unknown_model_is_a_clear_error(server: Server, args: list[str]) -> None:
    r = xllm(server.port, *args)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "Error:" in r.stderr and "no-such-model" in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("command", ["profile", "benchmark"])
def test_no_server_is_a_clear_error(command: str) -> None:
    port = free_port()
    r = xllm(port, command, MODEL)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert f"no xllm server is running at http://127.0.0.1:{port}" in r.stderr


@pytest.mark.parametrize("args", [["--concurrency", "0"], ["--gen-tokens", "4,x"]])
def test_bad_lists_are_usage_errors(args: list[str]) -> None:
    r = xllm(free_port(), "benchmark", MODEL, *args)
    assert r.returncode == 2
    assert "not a positive whole number" in r.stderr


def test_help() -> None:
    for command, flags in {
        "profile": ["--json", "--prompt-tokens", "--gen-tokens"],
        "benchmark": ["--concurrency", "--prompt-tokens", "--gen-tokens", "--requests",
                      "--json", "--report", "--prometheus"],
    }.items():  # fmt: skip
        r = xllm(free_port(), command, "--help")
        assert r.returncode == 0
        for flag in flags:
            assert flag in r.stdout


def test_prompt_longer_than_the_context_is_the_servers_error(server: Server) -> None:
    r = xllm(server.port, "benchmark", MODEL, "--concurrency", "1", "--prompt-tokens", "2000")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert "exceeds the context length of 1024 tokens" in r.stderr.splitlines()[-1]
