"""Pulling into the store from local stand-ins of the registry and the Hub, faults included.

Every fault ends in a clean error with nothing visible in the store (no manifest, no blob that
did not verify), and a clean retry succeeds (RELIABILITY items 8, 9, 11, 12, 13).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.projectors import write_projector
from tests.upstream import MODEL_TYPE, Upstream, manifest, sha
from xllm.config import Settings
from xllm.errors import InsufficientStorage, InvalidRequest, ModelNotFound, RegistryError
from xllm.models import download, hub, updates
from xllm.models import pull as pulling
from xllm.models import store as store_module
from xllm.models.names import parse_name
from xllm.models.store import Store


@pytest.fixture(scope="module")
def tiny(tiny_path: Path) -> bytes:
    return tiny_path.read_bytes()


@pytest.fixture
def upstream(tiny: bytes, tmp_path: Path) -> Iterator[Upstream]:
    u = Upstream()
    u.add_model("tiny", tiny)
    u.add_model("other", tiny + b"\0" * 32, namespace="someone", tag="v1")
    u.add_hf_repo(
        "org/Tiny-GGUF",
        {
            "tiny-Q4_K_M.gguf": tiny + b"\0" * 64,
            "tiny-Q8_0.gguf": tiny + b"\0" * 96,
            "mmproj-tiny-F16.gguf": write_projector(tmp_path / "mmproj.gguf", 16).read_bytes(),
            "README.md": b"# tiny",
        },
    )
    u.start()
    yield u
    u.stop()


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "models")


def settings(upstream: Upstream) -> Settings:
    return Settings(registry=upstream.url, hf_endpoint=upstream.url)


async def run(store: Store, upstream: Upstream, name: str, **kw: Any) -> list[dict[str, Any]]:
    return [r async for r in pulling.pull(store, settings(upstream), parse_name(name), **kw)]


def visible(store: Store) -> list[str]:
    """Blobs and manifests a user could see (partials and scratch files are not models)."""
    out = [p.name for p in store.blobs_dir.glob("sha256-*") if not p.name.endswith("-partial")]
    return sorted(out) + [str(p) for p in store.manifests_dir.rglob("*") if p.is_file()]


async def test_pull_from_the_registry(store: Store, upstream: Upstream, tiny: bytes) -> None:
    records = await run(store, upstream, "tiny")
    statuses = [r["status"] for r in records]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    digest = sha(tiny)
    layer = [r for r in records if r.get("digest") == digest]
    assert layer[-1] == {
        "status": f"pulling {digest[7:19]}",
        "digest": digest,
        "total": len(tiny),
        "completed": len(tiny),
    }
    model = store.get(parse_name("tiny"))
    assert model is not None and model.model_path.read_bytes() == tiny
    raw = upstream.manifests[("library", "tiny", "latest")]
    assert model.digest == sha(raw)  # the ID is the manifest's own digest, as in Ollama
    assert store.manifest_path(parse_name("tiny")).read_bytes() == raw
    assert [m.name.display for m in store.list()] == ["tiny:latest"]
    assert store.summary(model.model_digest).architecture == "llama"
    assert (store.metadata_dir / f"{digest.replace(':', '-')}.json").is_file()
    again = await run(store, upstream, "tiny")  # present: nothing downloaded twice
    assert again[-1]["status"] == "success" and upstream.hits[digest] == 1


async def test_pull_from_the_hub_by_quant(store: Store, upstream: Upstream, tiny: bytes) -> None:
    await run(store, upstream, "hf.co/org/Tiny-GGUF:Q8_0")
    model = store.get(parse_name("hf.co/org/Tiny-GGUF:q8_0"[:-4] + "Q8_0"))
    assert model is not None and model.model_path.read_bytes() == tiny + b"\0" * 96
    config = json.loads(store.blob_path(model.manifest.config.digest).read_bytes())
    assert config["source"]["file"] == "tiny-Q8_0.gguf"
    await run(store, upstream, "hf.co/org/Tiny-GGUF")  # no tag: Q4_K_M
    default = store.get(parse_name("hf.co/org/Tiny-GGUF:latest"))
    assert default is not None and default.model_path.read_bytes() == tiny + b"\0" * 64
    with pytest.raises(ModelNotFound, match="no Q2_K GGUF; available: Q4_K_M, Q8_0"):
        await run(store, upstream, "hf.co/org/Tiny-GGUF:Q2_K")
    with pytest.raises(ModelNotFound, match="not found on the Hub"):
        await run(store, upstream, "hf.co/org/missing")


async def test_hub_first_then_the_registry(store: Store, upstream: Upstream) -> None:
    await run(store, upstream, "org/Tiny-GGUF:Q8_0")  # on the Hub
    await run(store, upstream, "someone/other:v1")  # not on the Hub: the registry has it
    assert [m.name.display for m in store.list()] == ["org/Tiny-GGUF:Q8_0", "someone/other:v1"]
    with pytest.raises(ModelNotFound, match="not found in the registry"):
        await run(store, upstream, "nobody/nothing")


async def test_hf_token_goes_to_the_hub_only(
    store: Store, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    cdn = Upstream(blobs=upstream.blobs).start()  # another origin, as the Hub's CDN is
    try:
        upstream.hf_token, upstream.hf_redirect_to = "hf_secret", cdn.url
        monkeypatch.delenv("HF_TOKEN", raising=False)
        with pytest.raises(RegistryError, match="401"):
            await run(store, upstream, "hf.co/org/Tiny-GGUF")
        monkeypatch.setenv("HF_TOKEN", "hf_secret")
        await run(store, upstream, "hf.co/org/Tiny-GGUF")
        assert store.get(parse_name("hf.co/org/Tiny-GGUF")) is not None
        assert ("/api/models/org/Tiny-GGUF", "Bearer hf_secret") in upstream.auth_seen
        cdn_auth = [auth for path, auth in cdn.auth_seen if path.startswith("/cdn/")]
        # the redirects to another host (the model's, its projector's) carried no credentials
        assert cdn_auth == [None, None]
    finally:
        cdn.stop()


async def test_flipped_byte_fails_then_retry_succeeds(
    store: Store, upstream: Upstream, tiny: bytes
) -> None:
    upstream.flip.add(sha(tiny))
    with pytest.raises(RegistryError, match="digest mismatch"):
        await run(store, upstream, "tiny")
    assert visible(store) == []
    assert not list(store.blobs_dir.glob("*-partial"))  # bytes that lied are deleted
    upstream.flip.clear()
    await run(store, upstream, "tiny")
    assert store.get(parse_name("tiny")) is not None


async def test_cut_connection_fails_then_resumes(
    store: Store, upstream: Upstream, tiny: bytes
) -> None:
    digest = sha(tiny)
    upstream.cut[digest] = 0.5
    with pytest.raises(RegistryError, match="interrupted"):
        await run(store, upstream, "tiny")
    assert visible(store) == []
    partial = store.blob_path(digest).with_name(f"sha256-{digest[7:]}-partial")
    kept = partial.stat().st_size
    assert 0 < kept <= len(tiny) // 2 + 65536
    before = upstream.served[digest]
    await run(store, upstream, "tiny")
    assert store.get(parse_name("tiny")) is not None
    assert upstream.served[digest] - before == len(tiny) - kept  # resumed with a Range request
    assert not partial.exists()


def _rogue(upstream: Upstream, name: str, raw: bytes) -> None:
    upstream.manifests[("library", name, "latest")] = raw


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("traversal", "bad manifest: layer invalid digest"),
        ("too_many_layers", "1 to 64 layers"),
        ("huge_manifest", "larger than 1048576 bytes"),
        ("huge_size", "out of range"),
        ("not_json", "not valid JSON"),
        ("bad_media_type", "unsupported layer media type"),
        ("no_model_layer", "no model layer"),
    ],
)
async def test_rogue_manifests_fail_before_any_blob(
    store: Store, upstream: Upstream, tiny: bytes, case: str, message: str
) -> None:
    good = json.loads(manifest(b"{}", [(MODEL_TYPE, tiny)]))
    if case == "traversal":
        good["layers"][0]["digest"] = "sha256:../../../../etc/passwd"
    elif case == "too_many_layers":
        good["layers"] = good["layers"] * 100
    elif case == "huge_manifest":
        good["layers"] = good["layers"] * 10_000
    elif case == "huge_size":
        good["layers"][0]["size"] = 2**80
    elif case == "bad_media_type":
        good["layers"][0]["mediaType"] = "text/html"
    elif case == "no_model_layer":
        good["layers"][0]["mediaType"] = "application/vnd.ollama.image.license"
    raw = b"{not json" if case == "not_json" else json.dumps(good).encode()
    _rogue(upstream, "rogue", raw)
    with pytest.raises(RegistryError, match=message):
        await run(store, upstream, "rogue")
    assert visible(store) == [] and sum(upstream.hits.values()) == 0


async def test_duplicate_digest_redirected_to_other_bytes(
    store: Store, upstream: Upstream, tiny: bytes
) -> None:
    """Config and layer share a digest; its blob redirects to an "internal" path (Ollama #15504)."""
    digest = sha(tiny)
    good = json.loads(manifest(b"{}", [(MODEL_TYPE, tiny)]))
    good["config"] = dict(
        good["layers"][0], mediaType="application/vnd.docker.container.image.v1+json"
    )
    _rogue(upstream, "dup", json.dumps(good).encode())
    upstream.redirect[digest] = "/internal/x"
    with pytest.raises(RegistryError, match="sent 1024 of the 2789632 bytes"):
        await run(store, upstream, "dup")
    assert visible(store) == [] and upstream.hits[digest] == 1
    del upstream.redirect[digest]
    await run(store, upstream, "dup")
    assert store.get(parse_name("dup")) is not None


async def test_gzip_bomb_is_hashed_raw(store: Store, upstream: Upstream, tiny: bytes) -> None:
    upstream.gzip_bomb.add(sha(tiny))
    with pytest.raises(RegistryError, match="sent 65250 of the 2789632 bytes"):
        await run(store, upstream, "tiny")
    assert visible(store) == [] and not list(store.blobs_dir.glob("*-partial"))


async def test_malformed_gguf_is_refused_and_removed(store: Store, upstream: Upstream) -> None:
    bad = b"GGUF" + (3).to_bytes(4, "little") + (2**60).to_bytes(8, "little") * 2 + b"\0" * 64
    upstream.add_model("bad", bad)
    with pytest.raises(RegistryError, match="refuses"):
        await run(store, upstream, "bad")
    assert visible(store) == []


async def test_short_body_and_missing_blob(store: Store, upstream: Upstream, tiny: bytes) -> None:
    upstream.cut[sha(tiny)] = 0.1
    upstream.cut_once = False
    for _ in range(2):  # twice: the retry resumes and is cut again
        with pytest.raises(RegistryError):
            await run(store, upstream, "tiny")
    assert visible(store) == []
    del upstream.blobs[sha(tiny)]
    upstream.cut.clear()
    store.prune()
    with pytest.raises(RegistryError, match="not found"):
        await run(store, upstream, "tiny")
    assert visible(store) == []


async def test_disk_full_fails_cleanly_then_succeeds(
    store: Store, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write = os.write
    room = [1_000_000]

    def write(fd: int, data: Any) -> int:
        if room[0] < len(data):
            raise OSError(errno.ENOSPC, "No space left on device")
        room[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(store_module.os, "write", write)
    with pytest.raises(InsufficientStorage, match="no space left"):
        await run(store, upstream, "tiny")
    assert visible(store) == [] and not list(store.blobs_dir.glob("*-partial"))
    room[0] = 1 << 30  # space freed: the next pull works without a restart
    await run(store, upstream, "tiny")
    assert store.get(parse_name("tiny")) is not None


async def test_not_enough_space_is_refused_up_front(
    store: Store, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Store, "free_bytes", lambda self: 10)
    with pytest.raises(InsufficientStorage, match="not enough disk space"):
        await run(store, upstream, "tiny")
    assert sum(upstream.hits.values()) == 0


async def test_concurrent_pulls_fetch_each_blob_once(
    store: Store, upstream: Upstream, tiny: bytes
) -> None:
    upstream.drip_s = 0.005
    results = await asyncio.gather(*(run(store, upstream, "tiny") for _ in range(3)))
    assert all(r[-1]["status"] == "success" for r in results)
    assert upstream.hits[sha(tiny)] == 1 and upstream.served[sha(tiny)] == len(tiny)
    assert len([p for p in store.blobs_dir.iterdir() if p.name == f"sha256-{sha(tiny)[7:]}"]) == 1


async def test_two_processes_share_the_store(
    store: Store, upstream: Upstream, tiny: bytes, tmp_path: Path
) -> None:
    upstream.drip_s = 0.03
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from xllm.config import Settings
        from xllm.models.names import parse_name
        from xllm.models.pull import pull
        from xllm.models.store import Store

        async def main():
            s = Settings(registry={upstream.url!r}, hf_endpoint={upstream.url!r})
            async for r in pull(Store(Path({str(store.root)!r})), s, parse_name("tiny")):
                pass
            print("done")

        asyncio.run(main())
        """
    )
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    await asyncio.sleep(0.8)  # it has started its download
    await run(store, upstream, "tiny")
    out, _ = await asyncio.wait_for(other.communicate(), 120)
    assert other.returncode == 0 and out.decode().strip() == "done"
    assert upstream.served[sha(tiny)] == len(tiny)  # every byte fetched once
    assert not list(store.blobs_dir.glob("*-partial"))


def test_prune_removes_orphaned_partials_only(store: Store) -> None:
    store.blobs_dir.mkdir(parents=True)
    orphan = store.blobs_dir / f"sha256-{'a' * 64}-partial"
    orphan.write_bytes(b"half")
    held = store.blobs_dir / f"sha256-{'b' * 64}-partial"
    held.write_bytes(b"busy")
    fd = store_module._try_lock(held)  # a live writer (another process, as far as flock goes)
    assert fd is not None
    try:
        assert store.prune() == 1
        assert not orphan.exists() and held.exists()
    finally:
        os.close(fd)


async def test_push_to_a_configured_registry(store: Store, upstream: Upstream) -> None:
    await run(store, upstream, "tiny")
    store.copy(parse_name("tiny"), parse_name("me/copy:v2"))
    upstream.blobs.clear()
    records = [r async for r in pulling.push(store, settings(upstream), parse_name("me/copy:v2"))]
    assert [r["status"] for r in records][-2:] == ["pushing manifest", "success"]
    assert records[0]["status"] == "retrieving manifest"
    raw = store.manifest_path(parse_name("me/copy:v2")).read_bytes()
    assert upstream.manifests[("me", "copy", "v2")] == raw
    assert len(upstream.pushed) == 2  # config and model
    with pytest.raises(InvalidRequest, match=r"ollama\.com account key"):
        _ = [r async for r in pulling.push(store, Settings(), parse_name("me/copy:v2"))]
    with pytest.raises(ModelNotFound):
        _ = [r async for r in pulling.push(store, settings(upstream), parse_name("nope"))]


async def test_foreign_auth_realm_gets_nothing(store: Store, upstream: Upstream) -> None:
    """RELIABILITY item 10a: a 401 naming a token realm on another host is not followed."""
    other = Upstream().start()
    try:
        upstream.realm = other.url
        with pytest.raises(RegistryError, match=r"refused access .* \(HTTP 401\)"):
            await run(store, upstream, "tiny")
        assert other.hits["token"] == 0 and other.auth_seen == []
    finally:
        other.stop()


@pytest.mark.parametrize(
    ("host", "internal"),
    [("127.0.0.1", True), ("localhost", True), ("a.localhost", True), ("[::1]", True),
     ("169.254.169.254", True), ("10.0.0.8", True), ("192.168.1.1", True), ("0.0.0.0", True),
     ("fe80::1", True), ("", True), (None, True), ("registry.ollama.ai", False),
     ("8.8.8.8", False), ("huggingface.co", False)],
)  # fmt: skip
def test_what_counts_as_internal(host: str | None, internal: bool) -> None:
    assert download._internal(host) is internal


async def test_check_updates(store: Store, upstream: Upstream) -> None:
    await run(store, upstream, "hf.co/org/Tiny-GGUF:Q8_0")
    await run(store, upstream, "tiny")
    assert updates.check(store, "hf.co/org/Tiny-GGUF:Q8_0") == updates.UP_TO_DATE
    upstream.hf_sha = "d" * 40
    assert updates.check(store, "hf.co/org/Tiny-GGUF:Q8_0") == updates.AVAILABLE
    assert updates.check(store, "tiny") == "-"  # from the registry: no Hub revision
    assert updates.check(store, "../x") == "-"
    upstream.stop()
    assert updates.check(store, "hf.co/org/Tiny-GGUF:Q8_0") == updates.UNKNOWN


@pytest.mark.parametrize(
    ("files", "tag", "chosen"),
    [
        (["m-Q4_K_M.gguf", "m-Q8_0.gguf"], "latest", ["m-Q4_K_M.gguf"]),
        (["m-Q4_K_M.gguf", "m-Q8_0.gguf"], "q8_0", ["m-Q8_0.gguf"]),
        (["only.gguf"], "latest", ["only.gguf"]),
        (
            ["Q4_K_M/m-Q4_K_M-00002-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00001-of-00002.gguf",
             "Q8_0/m-Q8_0-00001-of-00001.gguf"],
            "latest",
            ["Q4_K_M/m-Q4_K_M-00001-of-00002.gguf", "Q4_K_M/m-Q4_K_M-00002-of-00002.gguf"],
        ),
        (
            ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf", "mmproj-f16.gguf"],
            "latest",
            ["m-00001-of-00002.gguf", "m-00002-of-00002.gguf"],
        ),
    ],
)  # fmt: skip
def test_choose_files(files: list[str], tag: str, chosen: list[str]) -> None:
    assert hub.choose_files(files, tag, "org/m") == chosen


def test_choose_files_refuses_an_incomplete_split() -> None:
    files = ["m-Q4_K_M-00001-of-00003.gguf", "m-Q4_K_M-00003-of-00003.gguf"]
    with pytest.raises(RegistryError, match=r"lacks m-Q4_K_M-00002-of-00003\.gguf"):
        hub.choose_files(files, "latest", "org/m")
