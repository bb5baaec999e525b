"""Local stand-ins for the Ollama registry and the Hugging Face Hub, with fault switches.

One aiohttp app speaks both protocols (as much of them as pull, push and huggingface_hub's
`model_info` need) and runs on a thread of its own, so sync tests, async tests and an
`xllm serve` subprocess can all use it. Switches (attributes) inject the faults of
RELIABILITY items 8-13; `hits`/`served` count what each blob cost.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import hashlib
import json
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

MANIFEST_TYPE = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG_TYPE = "application/vnd.docker.container.image.v1+json"
MODEL_TYPE = "application/vnd.ollama.image.model"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def manifest(config: bytes, layers: list[tuple[str, bytes]]) -> bytes:
    return json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": sha(config), "size": len(config)},
            "layers": [
                {"mediaType": media, "digest": sha(data), "size": len(data)}
                for media, data in layers
            ],
        }
    ).encode()


@dataclass
class Upstream:
    """The fake registry + Hub. Add models with `add_model`/`add_hf_repo`, then `start()`."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str, str], bytes] = field(default_factory=dict)
    hf_repos: dict[str, dict[str, bytes]] = field(default_factory=dict)
    # fault switches
    flip: set[str] = field(default_factory=set)
    """Digests served with one byte flipped."""
    cut: dict[str, float] = field(default_factory=dict)
    """Digest -> fraction after which the connection is cut (Content-Length stays whole)."""
    cut_once: bool = True
    """Heal a cut after it happened once (so a retry succeeds)."""
    redirect: dict[str, str] = field(default_factory=dict)
    """Digest -> Location its blob request is redirected to."""
    gzip_bomb: set[str] = field(default_factory=set)
    """Digests served as a gzip-encoded body that inflates far beyond the blob."""
    hf_token: str | None = None
    """Require `Authorization: Bearer <token>` on the Hub API and resolve URLs."""
    hf_gated: dict[str, str] = field(default_factory=dict)
    """Gated repos and their tokens: 403 `GatedRepo` without `Authorization: Bearer <token>`."""
    hf_redirect_to: str | None = None
    """Base URL (another origin) that Hub file downloads are redirected to, as the CDN."""
    drip_s: float = 0.0
    """Pause between 64 KiB chunks of a blob (a slow registry)."""
    hf_sha: str = "c0ffee" + "0" * 34
    """The revision the Hub reports for every repo."""
    realm: str | None = None
    """Answer manifest requests with 401 and a token realm at this URL (another host)."""
    # what happened
    hits: collections.Counter[str] = field(default_factory=collections.Counter)
    served: collections.Counter[str] = field(default_factory=collections.Counter)
    auth_seen: list[tuple[str, str | None]] = field(default_factory=list)
    pushed: dict[str, bytes] = field(default_factory=dict)
    url: str = ""
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None
    _runner: web.AppRunner | None = None

    # --- content --------------------------------------------------------------------------

    def add_blob(self, data: bytes) -> str:
        digest = sha(data)
        self.blobs[digest] = data
        return digest

    def add_model(
        self,
        name: str,
        model: bytes,
        extra: list[tuple[str, bytes]] | None = None,
        namespace: str = "library",
        tag: str = "latest",
    ) -> bytes:
        config = json.dumps({"model_format": "gguf", "name": name}).encode()
        layers = [(MODEL_TYPE, model), *(extra or [])]
        for data in [config, *(d for _, d in layers)]:
            self.add_blob(data)
        raw = manifest(config, layers)
        self.manifests[(namespace, name, tag)] = raw
        return raw

    def add_hf_repo(self, repo: str, files: dict[str, bytes]) -> None:
        self.hf_repos[repo] = files
        for data in files.values():
            self.add_blob(data)

    # --- running ----------------------------------------------------------------------------

    def start(self) -> Upstream:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            runner = web.AppRunner(self.app(), access_log=None)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self._runner = runner
            port = runner.addresses[0][1]
            self.url = f"http://127.0.0.1:{port}"
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop = self._thread = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_get("/v2/{ns}/{model}/manifests/{tag}", self._manifest)
        app.router.add_put("/v2/{ns}/{model}/manifests/{tag}", self._put_manifest)
        app.router.add_get("/v2/{ns}/{model}/blobs/{digest}", self._blob)
        app.router.add_post("/v2/{ns}/{model}/blobs/uploads/", self._start_upload)
        app.router.add_put("/v2/{ns}/{model}/blobs/uploads/{id}", self._upload)
        app.router.add_get("/internal/{digest}", self._internal)
        app.router.add_get("/cdn/{digest}", self._cdn)
        app.router.add_get("/token", self._token)
        app.router.add_get("/api/models/{org}/{repo}", self._hf_info)
        app.router.add_get("/api/models/{org}/{repo}/revision/{rev}", self._hf_info)
        app.router.add_get("/{org}/{repo}/resolve/{rev}/{file:.+}", self._hf_file)
        return app

    # --- registry ---------------------------------------------------------------------------

    async def _manifest(self, request: web.Request) -> web.Response:
        m = request.match_info
        if self.realm is not None:
            challenge = f'Bearer realm="{self.realm}/token",service="registry"'
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED"}]},
                status=401,
                headers={"WWW-Authenticate": challenge},
            )
        raw = self.manifests.get((m["ns"], m["model"], m["tag"]))
        if raw is None:
            return web.json_response({"errors": [{"code": "MANIFEST_UNKNOWN"}]}, status=404)
        return web.Response(body=raw, content_type=MANIFEST_TYPE)

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        if request.method == "HEAD":  # push asks whether the registry has it
            return web.Response(status=200 if digest in self.blobs else 404)
        self.hits[digest] += 1
        if digest in self.redirect:
            raise web.HTTPTemporaryRedirect(self.redirect[digest])
        return await self._send(request, digest)

    async def _internal(self, request: web.Request) -> web.Response:
        """Where a rogue manifest redirects: other bytes than the digest promises."""
        self.hits["internal"] += 1
        return web.Response(body=b"internal secret " * 64)

    async def _send(
        self, request: web.Request, digest: str, headers: dict[str, str] | None = None
    ) -> web.StreamResponse:
        data = self.blobs.get(digest)
        if data is None:
            return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=404)
        if digest in self.flip:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if digest in self.gzip_bomb:
            bomb = gzip.compress(b"\0" * (64 << 20))
            return web.Response(body=bomb, headers={"Content-Encoding": "gzip"})
        start = 0
        rng = request.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start = int(rng[6:-1])
        resp = web.StreamResponse(status=206 if start else 200, headers=headers)
        resp.content_length = len(data) - start
        if start:
            resp.headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        await resp.prepare(request)
        stop = len(data)
        if digest in self.cut:
            stop = int(len(data) * self.cut[digest])
            if self.cut_once:
                del self.cut[digest]
        pos = start
        while pos < stop:
            chunk = data[pos : min(pos + 65536, stop)]
            await resp.write(chunk)
            self.served[digest] += len(chunk)
            pos += len(chunk)
            if self.drip_s:
                await asyncio.sleep(self.drip_s)
        if stop < len(data):
            assert request.transport is not None
            request.transport.close()  # the connection drops mid-body
            return resp
        await resp.write_eof()
        return resp

    async def _start_upload(self, request: web.Request) -> web.Response:
        m = request.match_info
        location = f"/v2/{m['ns']}/{m['model']}/blobs/uploads/{uuid.uuid4().hex}"
        return web.Response(status=202, headers={"Location": location})

    async def _upload(self, request: web.Request) -> web.Response:
        digest = request.query.get("digest", "")
        data = await request.read()
        if sha(data) != digest:
            return web.json_response({"errors": [{"code": "DIGEST_INVALID"}]}, status=400)
        self.blobs[digest] = data
        self.pushed[digest] = data
        return web.Response(status=201)

    async def _put_manifest(self, request: web.Request) -> web.Response:
        m = request.match_info
        raw = await request.read()
        for layer in [json.loads(raw)["config"], *json.loads(raw)["layers"]]:
            if layer["digest"] not in self.blobs:
                return web.json_response({"errors": [{"code": "BLOB_UNKNOWN"}]}, status=400)
        self.manifests[(m["ns"], m["model"], m["tag"])] = raw
        return web.Response(status=201)

    # --- Hugging Face Hub -------------------------------------------------------------------

    def _hf_refusal(self, request: web.Request) -> web.Response | None:
        """401 without `hf_token` (when set); 403 `GatedRepo` for a gated repo without its own."""
        auth = request.headers.get("Authorization")
        self.auth_seen.append((request.path, auth))
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        if repo in self.hf_gated and auth != f"Bearer {self.hf_gated[repo]}":
            return web.json_response(
                {"error": f"Access to model {repo} is restricted."},
                status=403,
                headers={"X-Error-Code": "GatedRepo"},
            )
        if self.hf_token is not None and auth != f"Bearer {self.hf_token}":
            return web.json_response({"error": "Invalid credentials"}, status=401)
        return None

    async def _hf_info(self, request: web.Request) -> web.Response:
        refusal = self._hf_refusal(request)
        if refusal is not None:
            return refusal
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        files = self.hf_repos.get(repo)
        if files is None:
            return web.json_response(
                {"error": "Repository not found"},
                status=404,
                headers={"X-Error-Code": "RepoNotFound"},
            )
        siblings = [hf_sibling(name, data) for name, data in files.items()]
        return web.json_response(
            {"id": repo, "sha": self.hf_sha, "private": False, "siblings": siblings}
        )

    async def _hf_file(self, request: web.Request) -> web.StreamResponse:
        refusal = self._hf_refusal(request)
        if refusal is not None:
            return refusal
        repo = f"{request.match_info['org']}/{request.match_info['repo']}"
        if repo not in self.hf_repos:
            return web.json_response(
                {"error": "Repository not found"},
                status=404,
                headers={"X-Error-Code": "RepoNotFound"},
            )
        data = self.hf_repos[repo].get(request.match_info["file"])
        if data is None:
            return web.json_response(
                {"error": "Entry not found"}, status=404, headers={"X-Error-Code": "EntryNotFound"}
            )
        digest = sha(data)
        # what hf_hub_download's metadata request reads: the commit and the file's ETag
        meta = {"X-Repo-Commit": self.hf_sha, "ETag": f'"{git_blob_id(data)}"'}
        if request.method == "HEAD":
            return web.Response(headers={**meta, "Content-Length": str(len(data))})
        self.hits[digest] += 1
        if self.hf_redirect_to:
            raise web.HTTPFound(f"{self.hf_redirect_to}/cdn/{digest}")
        return await self._send(request, digest, meta)

    async def _token(self, request: web.Request) -> web.Response:
        self.hits["token"] += 1
        self.auth_seen.append((request.path, request.headers.get("Authorization")))
        return web.json_response({"token": "t"})

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        self.auth_seen.append((request.path, request.headers.get("Authorization")))
        return await self._send(request, request.match_info["digest"])


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


LFS_SUFFIXES = (".gguf", ".safetensors", ".bin")
"""What the Hub's default .gitattributes keeps in LFS (with anything of 10 MiB or more)."""


def hf_sibling(name: str, data: bytes) -> dict[str, Any]:
    """A file as the Hub's `model_info(files_metadata=True)` lists it: `blobId` is the git
    blob id (of the LFS pointer for LFS files, which also carry `lfs` with their SHA-256)."""
    if not name.endswith(LFS_SUFFIXES) and len(data) < 10 << 20:
        return {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
    oid = sha(data)[7:]
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {len(data)}\n"
    return {
        "rfilename": name,
        "size": len(data),
        "blobId": git_blob_id(pointer.encode()),
        "lfs": {"sha256": oid, "size": len(data), "pointerSize": len(pointer)},
    }


def store_files(root: Path) -> Iterator[Path]:
    """Every file under a models dir (for "nothing left behind" checks)."""
    return (p for p in root.rglob("*") if p.is_file())
