"""Generated images answered by URL: written to `images.directory`, served at
`GET /images/<id>.<png|jpeg|webp>` and deleted `images.ttl_hours` after they were made.

An id is 128 random bits in hex: it is the image's only secret (as OpenAI's URLs are signed),
so the route needs no API key, lists nothing and takes nothing but that exact shape (no path
ever reaches the filesystem from a request). A sweeper deletes expired files at start-up and
then every so often; a file past its time that the sweeper has not reached yet is a 404 too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web

from xllm.errors import NotFound
from xllm.server.state import SETTINGS

log = logging.getLogger("xllm.server")

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
NAME = re.compile(r"[0-9a-f]{32}\.(?:png|jpeg|webp)")
PREFIX = "/images/"
_SWEEP_S = (0.25, 60.0)
"""The sweeper runs every quarter of the TTL, within these bounds (seconds)."""


class ImageFiles:
    """The folder of generated images and their time to live."""

    def __init__(self, directory: Path, ttl_s: float) -> None:
        self.directory = directory
        self.ttl_s = ttl_s

    def save(self, data: bytes, fmt: str) -> str:
        """Write an image (readable by this user only) and return its file name."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{secrets.token_hex(16)}.{fmt}"
        tmp = self.directory / f".{name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, self.directory / name)
        return name

    def find(self, name: str) -> Path | None:
        """The file of an image that has not expired; None for any other name."""
        if NAME.fullmatch(name) is None:
            return None
        path = self.directory / name
        try:
            made = path.stat().st_mtime
        except OSError:
            return None
        if time.time() - made > self.ttl_s:
            path.unlink(missing_ok=True)
            return None
        return path

    def sweep(self) -> int:
        """Delete every expired image (and any file left half-written); how many went."""
        gone = 0
        now = time.time()
        with contextlib.suppress(FileNotFoundError), os.scandir(self.directory) as entries:
            for entry in entries:
                ours = NAME.fullmatch(entry.name) or entry.name.endswith(".tmp")
                with contextlib.suppress(OSError):
                    if ours and entry.is_file() and now - entry.stat().st_mtime > self.ttl_s:
                        os.unlink(entry.path)
                        gone += 1
        return gone


IMAGE_FILES = web.AppKey("image_files", ImageFiles)


async def sweeper(app: web.Application) -> AsyncIterator[None]:
    """The app's image folder, swept at start-up and then periodically."""
    settings = app[SETTINGS]
    files = ImageFiles(settings.images_dir, settings.images_ttl_hours * 3600)
    app[IMAGE_FILES] = files
    interval = min(max(files.ttl_s / 4, _SWEEP_S[0]), _SWEEP_S[1])

    async def sweep() -> None:
        gone = await asyncio.to_thread(files.sweep)
        if gone:
            log.info("deleted %d expired image(s) from %s", gone, files.directory)

    async def loop() -> None:
        while True:
            await asyncio.sleep(interval)
            await sweep()

    await sweep()  # before the server answers: no expired file is served from the start
    task = asyncio.create_task(loop())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def serve(request: web.Request) -> web.StreamResponse:
    """`GET /images/{name}`: a generated image, until it expires."""
    name = request.match_info["name"]
    path = await asyncio.to_thread(request.app[IMAGE_FILES].find, name)
    if path is None:
        raise NotFound(f"image {name[:80]!r} not found (images expire; ids are exact)")
    response = web.FileResponse(path)
    response.content_type = CONTENT_TYPES[name.rsplit(".", 1)[1]]
    response.headers["Cache-Control"] = "private, max-age=3600"
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


def url(request: web.Request, name: str) -> str:
    """An image's absolute URL: under `images.public_url`, else the request's own host."""
    base = request.app[SETTINGS].images_public_url or f"{request.scheme}://{request.host}"
    return f"{base}{PREFIX}{name}"
