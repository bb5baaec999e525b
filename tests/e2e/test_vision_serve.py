"""`xllm serve --model M.gguf --mmproj P.gguf` and `xllm show` as a user runs them: the
projector (a tiny random one, tests/projectors.py) travels with its model, which then has the
`vision` capability and its projector's facts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.conftest import start_server, stop_server
from tests.projectors import write_projector


def test_serve_with_mmproj_then_show(tmp_path: Path, tiny_path: Path) -> None:
    projector = write_projector(tmp_path / "projector.gguf", 16)
    server = start_server(tmp_path, ["--model", str(tiny_path), "--mmproj", str(projector)])
    try:
        shown = httpx.post(f"{server.url}/api/show", json={"model": "tiny"}, timeout=30).json()
        assert "vision" in shown["capabilities"], shown
        assert shown["projector_info"]["clip.vision.projection_dim"] == 16
        assert f"FROM {projector}" in shown["modelfile"]
        env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{server.port}"}
        r = subprocess.run(
            [sys.executable, "-m", "xllm", "show", "tiny"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert "    vision" in r.stdout and "  Projector\n    architecture        clip" in r.stdout
        assert "projector type      mlp" in r.stdout
    finally:
        stop_server(server)
