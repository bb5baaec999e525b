"""Schemathesis over `/openapi.json` (RELIABILITY 17): generated valid and invalid requests to
every operation of both dialects, model management included (pulls go to a local registry);
no response may be a server error, and every status and body must match the document."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server
from tests.upstream import Upstream

EXAMPLES = int(os.environ.get("XLLM_SCHEMATHESIS_EXAMPLES", "200"))


def test_no_server_errors_over_the_whole_api(tmp_path: Path, tiny_path: Path) -> None:
    upstream = Upstream()
    upstream.add_model("tiny", tiny_path.read_bytes())
    upstream.start()
    env = {"XLLM_REGISTRY": upstream.url, "HF_ENDPOINT": upstream.url}
    # --max-tokens: a fuzzed `num_ctx` reloads SmolLM2 at its trained 8,192 tokens, and a chat
    # without max_tokens then filled them for over 5 minutes on a 2-core Xeon (a 200 in the end)
    args = ["--model", str(tiny_path), "--ctx-size", "128", "--parallel", "4", "--max-tokens", "64"]
    s = start_server(tmp_path, args, env=env)
    try:
        pid = s.proc.pid
        report = tmp_path / "junit.xml"
        r = subprocess.run(
            [
                sys.executable, "-m", "schemathesis.cli", "run", f"{s.url}/openapi.json",
                "--checks", "not_a_server_error,status_code_conformance,"
                "content_type_conformance,response_schema_conformance",
                "--mode", "all", "--max-examples", str(EXAMPLES), "--seed", "1",
                "--workers", "1", "--request-timeout", "60",
                "--report", "junit", "--report-junit-path", str(report),
            ],
            capture_output=True, text=True, timeout=1500,
        )  # fmt: skip
        print(r.stdout[-3000:])
        assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
        assert s.proc.poll() is None and s.proc.pid == pid
        assert httpx.get(f"{s.url}/api/version", timeout=1).status_code == 200
        logs = s.logs()
        assert "the runner process for model" not in logs  # no runner died (crash or watchdog)
        assert "Traceback" not in logs
    finally:
        stop_server(s)
        upstream.stop()
