"""`engines.remote` and security: base URLs are http(s) without credentials in them, the API key
comes from a file (or the environment), goes to the upstream and into no log line, TLS
certificates are verified unless the endpoint says otherwise; and the shipped example of xllm in
front of a vLLM + Ray cluster (deploy/) loads."""

from __future__ import annotations

import logging
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from tests.conftest import free_port
from xllm.config import ConfigError, RemoteEndpoint, load_settings
from xllm.engine.upstream import Pool

ROOT = Path(__file__).parents[1]
KEY = "sk-from-a-file-0123456789"


@pytest.fixture(autouse=True)
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.delenv("XLLM_REMOTE", raising=False)
    monkeypatch.setenv("XLLM_HOME", str(tmp_path))
    cfg = tmp_path / "config.yaml"
    monkeypatch.setenv("XLLM_CONFIG", str(cfg))
    return cfg


def _endpoint(cfg: Path, **fields: Any) -> RemoteEndpoint:
    remote = {"name": "up", "base_url": "http://127.0.0.1:8000/v1", **fields}
    cfg.write_text(yaml.safe_dump({"engines": {"remote": [remote]}}))
    (endpoint,) = load_settings().remote
    return endpoint


@pytest.mark.parametrize(
    ("base_url", "error"),
    [
        ("ftp://gpu1:8000/v1", "expected an http:// or https:// URL"),
        ("file:///etc/passwd", "expected an http:// or https:// URL"),
        ("unix:///run/vllm.sock", "expected an http:// or https:// URL"),
        ("gpu1:8000", "expected an http:// or https:// URL"),
        ("http://user:secret@gpu1:8000/v1", "credentials in the URL are refused"),
        ("https://sk-123@gpu1/v1", "credentials in the URL are refused"),
        (["http://gpu1:8000", "http://k@gpu2:8000"], "base_url[1]: credentials in the URL"),
    ],
)
def test_base_urls_refused(config: Path, base_url: str | list[str], error: str) -> None:
    with pytest.raises(ConfigError, match=error.replace("[", r"\[").replace("]", r"\]")):
        _endpoint(config, base_url=base_url)


def test_base_urls_taken_and_tls_verified_by_default(config: Path) -> None:
    e = _endpoint(config, base_url=["http://gpu1:8000/v1/", "https://gpu2.lan"])
    assert e.base_urls == ("http://gpu1:8000", "https://gpu2.lan")
    assert e.verify_tls is True
    assert _endpoint(config, verify_tls=False).verify_tls is False


@pytest.mark.parametrize(
    ("text", "error"), [(None, "cannot read api_key_file"), ("\n", "api_key_file .* is empty")]
)
def test_an_unusable_key_file_is_refused(
    config: Path, tmp_path: Path, text: str | None, error: str
) -> None:
    path = tmp_path / "key"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=error):
        Pool(_endpoint(config, api_key_file=str(path)))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ssl.SSLContext]:
    """A TLS server context with a self-signed certificate (no CA trusts it)."""
    tmp = tmp_path_factory.mktemp("tls")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    yield context


class Upstream:
    """An https upstream's `/v1/models` that records the Authorization headers it gets."""

    def __init__(self) -> None:
        self.port = free_port()
        self.authorizations: list[str | None] = []

    async def models(self, request: web.Request) -> web.Response:
        self.authorizations.append(request.headers.get("Authorization"))
        return web.json_response({"data": [{"id": "m", "max_model_len": 4096}]})


@pytest.fixture
async def upstream(certificate: ssl.SSLContext) -> AsyncIterator[Upstream]:
    u = Upstream()
    app = web.Application()
    app.router.add_get("/v1/models", u.models)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", u.port, ssl_context=certificate).start()
    yield u
    await runner.cleanup()


async def test_tls_verified_and_the_file_key_sent_but_never_logged(
    config: Path, tmp_path: Path, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key_file = tmp_path / "cluster.key"
    key_file.write_text(f"{KEY}\n")
    url = f"https://127.0.0.1:{upstream.port}/v1"
    for verify, state in ((None, "down"), (False, "up")):
        extra = {} if verify is None else {"verify_tls": verify}
        pool = Pool(_endpoint(config, base_url=url, api_key_file=str(key_file), **extra))
        try:
            await pool.check(pool.upstreams[0])
        finally:
            await pool.close()
        u = pool.upstreams[0]
        assert u.state == state, u.error
        if state == "down":  # the self-signed certificate is refused: nothing was sent
            assert "certificate verify failed" in (u.error or "")
            assert upstream.authorizations == []
    assert upstream.authorizations == [f"Bearer {KEY}"]
    assert pool.models["m"]["max_model_len"] == 4096
    assert "is down" in caplog.text and "is up" in caplog.text
    assert KEY not in caplog.text and KEY not in repr(vars(pool))


def test_the_vllm_ray_example_loads(config: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XLLM_CONFIG", str(ROOT / "deploy" / "vllm-ray.yaml"))
    (cluster,) = load_settings().remote
    assert cluster.flavour == "vllm" and cluster.balance == "least_outstanding"
    assert len(cluster.base_urls) >= 2
    assert all(u.startswith("http") and not u.endswith("/v1") for u in cluster.base_urls)
    assert cluster.api_key_env and cluster.models
    monkeypatch.setenv(cluster.api_key_env, "sk-cluster")
    assert Pool(cluster).headers()["Authorization"] == "Bearer sk-cluster"
