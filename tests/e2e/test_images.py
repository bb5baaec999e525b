"""Image generation through a real `xllm serve` on stable-diffusion.cpp, with the tiny
random-weight FLUX.2-klein-style model the tests write (tests/diffusion_models.py) beside
SmolLM2: exact odd sizes, seeds, URLs and their expiry, b64_json, the official `openai`
client, progress in the metrics, a disconnect that stops the runner and nothing else, bad
requests. Its pictures are noise: this checks the plumbing, not the images."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import os
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.conftest import Server, start_server, stop_server
from tests.diffusion_models import write_tiny_flux2
from tests.e2e.test_cli_models import rows, xllm
from tests.e2e.test_metrics import scrape, value

MODEL = "tiny-flux"
TTL_S = 12.0
FAST = {"steps": 1, "cfg_scale": 1.0}


@pytest.fixture(scope="module")
def images_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if importlib.util.find_spec("stable_diffusion_cpp") is None:
        pytest.fail(
            "stable-diffusion-cpp-python (the images extra) is missing: bash tests/setup.sh"
        )
    tmp = tmp_path_factory.mktemp("images")
    folder = write_tiny_flux2(tmp / MODEL)
    s = start_server(
        tmp,
        ["--model", str(folder), "--model", "smollm2:135m", "--ctx-size", "512"],
        env={
            "XLLM_IMAGES_TTL_HOURS": str(TTL_S / 3600),
            "XLLM_LOG": "debug",
            "XLLM_MEMORY_BUDGET": "3GiB",
        },
        wait_model=False,
    )
    yield s
    stop_server(s)


def generate(server: Server, timeout: float = 300, **body: object) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/images/generations",
                      json={"model": MODEL, **FAST, **body}, timeout=timeout)  # fmt: skip


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def test_n_2_gives_two_different_images_of_exactly_the_odd_size(images_server: Server) -> None:
    r = generate(images_server, prompt="a red apple", size="100x70", n=2, seed=1,
                 response_format="b64_json")  # fmt: skip
    assert r.status_code == 200, r.text
    data = [base64.b64decode(d["b64_json"]) for d in r.json()["data"]]
    images = [decode(d) for d in data]
    assert [(i.format, i.size, i.mode) for i in images] == [("PNG", (100, 70), "RGB")] * 2
    assert data[0] != data[1]
    assert images[0].getextrema() != ((0, 0), (0, 0), (0, 0))  # something was painted


def test_the_same_seed_and_prompt_give_the_same_bytes(images_server: Server) -> None:
    def one(prompt: str, seed: int) -> bytes:
        r = generate(images_server, prompt=prompt, size="64x48", seed=seed,
                     response_format="b64_json")  # fmt: skip
        assert r.status_code == 200, r.text
        return base64.b64decode(r.json()["data"][0]["b64_json"])

    first = one("a blue boat", 7)
    assert one("a blue boat", 7) == first
    assert one("a blue boat", 8) != first
    assert one("a green tree", 7) != first


def test_a_url_is_a_png_until_its_time_is_up(images_server: Server) -> None:
    r = generate(images_server, prompt="a house", size="33x17", seed=3)
    assert r.status_code == 200, r.text
    made = time.monotonic()
    url = r.json()["data"][0]["url"]
    assert url.startswith(f"{images_server.url}/images/") and url.endswith(".png")
    got = httpx.get(url)
    assert got.status_code == 200 and got.headers["content-type"] == "image/png"
    assert decode(got.content).size == (33, 17)
    file = images_server.home / "images" / url.rsplit("/", 1)[1]
    assert file.read_bytes() == got.content
    time.sleep(max(0.0, TTL_S + 1.0 - (time.monotonic() - made)))
    assert httpx.get(url).status_code == 404
    deadline = time.monotonic() + 10
    while file.exists() and time.monotonic() < deadline:  # the sweeper's next round
        time.sleep(0.5)
    assert not file.exists()


def test_b64_json_decodes_to_a_png_and_leaves_no_file(images_server: Server) -> None:
    before = set((images_server.home / "images").glob("*"))
    r = generate(images_server, prompt="a cat", size="16x16", response_format="b64_json")
    assert r.status_code == 200, r.text
    assert decode(base64.b64decode(r.json()["data"][0]["b64_json"])).size == (16, 16)
    assert set((images_server.home / "images").glob("*")) == before


def test_the_openai_client(images_server: Server) -> None:
    client = openai.OpenAI(base_url=f"{images_server.url}/v1", api_key="x", max_retries=0,
                           timeout=300)  # fmt: skip
    result = client.images.generate(
        model=MODEL,
        prompt="a lighthouse",
        size="48x32",  # type: ignore[arg-type]
        response_format="b64_json",
        n=1,
        extra_body={**FAST, "seed": 11},
    )
    assert result.data is not None and result.data[0].b64_json is not None
    assert decode(base64.b64decode(result.data[0].b64_json)).size == (48, 32)
    jpeg = client.images.generate(model=MODEL, prompt="a lighthouse", size="48x32",  # type: ignore[arg-type]
                                  output_format="jpeg", extra_body=FAST)  # fmt: skip
    assert jpeg.data is not None and jpeg.data[0].url is not None
    assert decode(httpx.get(jpeg.data[0].url).content).format == "JPEG"


@pytest.mark.parametrize(
    "path",
    ["/images/../../etc/passwd", "/images/..%2F..%2Fetc%2Fpasswd", "/images/", "/images/x.png",
     "/images/%2e%2e%2fmodels"],
)  # fmt: skip
def test_traversal_attempts_are_404(images_server: Server, path: str) -> None:
    with socket.create_connection(("127.0.0.1", images_server.port)) as s:  # the path as is
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404"), answer[:200]
    assert b"root:" not in answer


def test_capabilities_show_and_ps(images_server: Server) -> None:
    models = httpx.get(f"{images_server.url}/v1/models").json()["data"]
    entry = next(m for m in models if m["id"] == f"{MODEL}:latest")
    assert entry["capabilities"] == ["image_generation"]
    show = httpx.post(f"{images_server.url}/api/show", json={"model": MODEL}).json()
    assert show["capabilities"] == ["image_generation"]
    assert show["model_info"]["general.architecture"] == "Flux.2 klein"
    assert show["model_info"]["diffusion.parts"] == ["diffusion_model", "llm", "taesd"]
    generate(images_server, prompt="x", size="16x16", response_format="b64_json")
    ps = httpx.get(f"{images_server.url}/api/ps").json()["models"]
    assert any(m["name"] == f"{MODEL}:latest" and m["size"] > 25_000_000 for m in ps), ps


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "n": 11}, "n"),
        ({"prompt": "x", "size": "5000x5000"}, "size"),
        ({"prompt": "x", "sampler": "nope"}, "sampler"),
        ({"prompt": "x", "model": "smollm2:135m"}, "model"),
    ],
)
def test_bad_requests_are_400s_naming_the_field(
    images_server: Server, body: dict[str, object], param: str
) -> None:
    r = generate(images_server, **body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_an_image_larger_than_the_memory_left_is_a_507_naming_size(images_server: Server) -> None:
    """2048x2048 is within images.max_pixels, but takes about 7.5 GiB beyond the model's plan,
    more than the 3 GiB budget holds: refused before it runs, and the model stays served."""
    r = generate(images_server, prompt="too large", size="2048x2048")
    assert r.status_code == 507, r.text
    error = r.json()["error"]
    assert error["param"] == "size" and error["code"] == "insufficient_memory"
    assert "2048x2048" in error["message"] and "beyond its plan" in error["message"]
    ok = generate(images_server, prompt="small", size="16x16", response_format="b64_json")
    assert ok.status_code == 200, ok.text


def test_an_image_model_asked_to_chat_is_a_400(images_server: Server) -> None:
    r = httpx.post(f"{images_server.url}/v1/chat/completions", timeout=120,
                   json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text


def _runner_pids(server: Server) -> dict[str, int]:
    health = httpx.get(f"{server.url}/v0/health").json()
    return {m["name"]: m["runner_pid"] for m in health["models"]}


def test_progress_in_the_metrics_and_a_disconnect_stops_only_that_runner(
    images_server: Server,
) -> None:
    chat = {"model": "smollm2:135m", "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4}  # fmt: skip
    assert httpx.post(f"{images_server.url}/v1/chat/completions", json=chat,
                      timeout=120).status_code == 200  # fmt: skip
    generate(images_server, prompt="warm up", size="16x16", response_format="b64_json")
    before = _runner_pids(images_server)
    steps_before = value(
        scrape(images_server), "xllm_diffusion_steps_total", model=f"{MODEL}:latest"
    )
    body = json.dumps({"model": MODEL, "prompt": "a long one", "size": "256x256", "steps": 30})
    with socket.create_connection(("127.0.0.1", images_server.port)) as s:
        s.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
        deadline = time.monotonic() + 120
        step, planned = 0.0, 0.0
        while time.monotonic() < deadline:
            metrics = scrape(images_server)
            step = value(metrics, "xllm_diffusion_step", model=f"{MODEL}:latest")
            planned = value(metrics, "xllm_diffusion_steps_planned", model=f"{MODEL}:latest")
            if planned == 30 and step >= 1:  # this generation's (the warm-up's stay till then)
                break
            time.sleep(0.2)
        assert (planned, step >= 1) == (30, True), "no step progress reached /v0/metrics"
        assert value(metrics, "xllm_diffusion_steps_total",
                     model=f"{MODEL}:latest") > steps_before  # fmt: skip
    # the client went away mid-generation: its runner is stopped, and a new one loaded at once
    old = before[f"{MODEL}:latest"]
    deadline = time.monotonic() + 60
    while _runner_pids(images_server).get(f"{MODEL}:latest", old) == old:
        assert time.monotonic() < deadline, "the cancelled generation's runner still runs"
        time.sleep(0.2)
    assert "a generation was cancelled; stopping its runner" in images_server.logs()
    assert ", step 1 of 30" in images_server.logs()  # progress in the debug log
    with pytest.raises(ProcessLookupError):
        os.kill(old, 0)
    after = _runner_pids(images_server)
    assert after["smollm2:135m"] == before["smollm2:135m"]
    # no request has come since, yet the model is loaded again (in `ps` too)
    ps = httpx.get(f"{images_server.url}/api/ps").json()
    assert f"{MODEL}:latest" in [m["name"] for m in ps["models"]], ps
    restarted = after[f"{MODEL}:latest"]
    loads = images_server.logs().count(f"loaded model {MODEL}:latest")
    r = httpx.post(f"{images_server.url}/v1/chat/completions", json=chat, timeout=120)
    assert r.status_code == 200
    again = generate(images_server, prompt="after", size="16x16", response_format="b64_json")
    assert again.status_code == 200, again.text
    assert _runner_pids(images_server)[f"{MODEL}:latest"] == restarted  # it did not load again
    assert images_server.logs().count(f"loaded model {MODEL}:latest") == loads


def test_xllm_create_list_show_and_rm_from_a_modelfile(
    images_server: Server, tmp_path: Path
) -> None:
    folder = write_tiny_flux2(tmp_path / "parts", seed=1)
    (tmp_path / "Modelfile").write_text("FROM ./parts\n")
    made = xllm(images_server.port, "create", "my-flux", "-f", "Modelfile", cwd=tmp_path)
    assert made.returncode == 0, made.stderr
    listed = xllm(images_server.port, "list")
    assert any(r[0] == "my-flux:latest" for r in rows(listed.stdout)), listed.stdout
    shown = xllm(images_server.port, "show", "my-flux")
    assert shown.returncode == 0 and "Flux.2 klein" in shown.stdout, shown.stdout
    assert "image_generation" in shown.stdout
    r = httpx.post(f"{images_server.url}/v1/images/generations", timeout=300, json={
        "model": "my-flux", "prompt": "stored", "size": "20x12", **FAST,
        "response_format": "b64_json"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert decode(base64.b64decode(r.json()["data"][0]["b64_json"])).size == (20, 12)
    gone = xllm(images_server.port, "rm", "my-flux", "--force")
    assert gone.returncode == 0, gone.stderr
    assert "my-flux" not in xllm(images_server.port, "list").stdout
    assert folder.is_dir()  # the user's files stay where they were


def test_a_cancel_with_others_waiting_keeps_the_runner_and_their_work(
    images_server: Server,
) -> None:
    generate(images_server, prompt="warm up", size="16x16", response_format="b64_json")
    pid = _runner_pids(images_server)[f"{MODEL}:latest"]
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the runner's counters arrive twice a second
        made = value(scrape(images_server), "xllm_images_generated_total", model=f"{MODEL}:latest")
        if made >= 1:
            break
        time.sleep(0.2)
    assert made >= 1
    stops = images_server.logs().count("stopping its runner")
    body = json.dumps({"model": MODEL, "prompt": "abandoned", "size": "256x256", "steps": 30})
    with socket.create_connection(("127.0.0.1", images_server.port)) as s:
        s.sendall(f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                  f"application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())  # fmt: skip
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if value(scrape(images_server), "xllm_diffusion_step", model=f"{MODEL}:latest") >= 1:
                break
            time.sleep(0.1)
        with ThreadPoolExecutor(1) as pool:  # a second request waits behind the first
            waiting = pool.submit(generate, images_server, prompt="kept", size="24x24",
                                  response_format="b64_json")  # fmt: skip
            time.sleep(0.5)
            s.close()  # the first client goes away; the second must still be answered
            r = waiting.result()
    assert r.status_code == 200, r.text
    assert decode(base64.b64decode(r.json()["data"][0]["b64_json"])).size == (24, 24)
    assert _runner_pids(images_server)[f"{MODEL}:latest"] == pid
    assert images_server.logs().count("stopping its runner") == stops
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # the runner's counters arrive twice a second
        now = value(scrape(images_server), "xllm_images_generated_total", model=f"{MODEL}:latest")
        if now >= made + 2:  # the abandoned image was made (and dropped), then the kept one
            break
        time.sleep(0.2)
    assert now >= made + 2
