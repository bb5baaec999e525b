"""Images of prompts: read from what a request sent, checked and decoded to RGB by xllm.

Engines never parse image files (libmtmd's helper would start `ffprobe` on bytes it does not
know); they get an `Image`: its size, its pixels and a digest. Every image a request gives is
checked before its pixels are decoded, from the file's header: its format (PNG, JPEG, WebP,
GIF, BMP only: Pillow's other readers, some of which run programs, are never used), its pixel
count (a few-KB PNG may claim 30,000 x 30,000) and its aspect ratio (vision preprocessors have
crashed on 52,800 x 44); a request holds a bounded number of them. A mistake is a 400 naming
the request field the image came from (`messages[1].content[2].image_url`).

An image arrives as a `data:` URI, raw base64, or (only where the server allows it) an
http(s) URL, fetched by `xllm.remote_images`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import PIL.Image
import PIL.ImageOps

from xllm.engine.protocol import Image
from xllm.errors import InvalidRequest

MAX_IMAGES = 16
"""Images in one request (all its messages together)."""
MAX_PIXELS = 32 * 2**20
"""Pixels of one image (8192 x 4096): about 100 MB once decoded to RGB."""
MAX_TOTAL_PIXELS = 2 * MAX_PIXELS
"""Pixels of all a request's images together."""
MAX_ASPECT = 20
"""Longest side over shortest: wider panoramas and taller screenshots must be cut."""
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
REMOTE_REFUSED = (
    "this server does not fetch image URLs; send the image as a data: URI "
    "(data:image/png;base64,...) or base64 (a server may allow http(s) URLs with "
    "XLLM_REMOTE_IMAGES=true)"
)
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class Source:
    """One image as a request gave it."""

    param: str
    """The request field it came from, for errors (`messages[0].images[1]`)."""
    value: str
    """A `data:` URI, raw base64, or a URL."""

    @property
    def is_url(self) -> bool:
        return bool(_URL.match(self.value))


Fetch = Callable[[Source], Awaitable[bytes]]
"""Downloads a URL source's bytes (or refuses it with a 400 naming its field)."""


def check_count(sources: Sequence[Source]) -> None:
    """A 400 naming the first image past `MAX_IMAGES`, before anything is decoded."""
    if len(sources) > MAX_IMAGES:
        over = sources[MAX_IMAGES]
        raise InvalidRequest(
            f"{over.param}: a request may hold at most {MAX_IMAGES} images, this one has "
            f"{len(sources)}",
            param=over.param,
        )


def encoded(source: Source) -> bytes:
    """The file bytes of a `data:` URI or raw base64 source (not of a URL)."""
    value = source.value
    if value.startswith("data:"):
        head, comma, value = value.partition(",")
        media = head[5:].split(";")
        if not comma or "base64" not in media[1:]:
            raise refusal(source, "a data: URI must be base64 (data:image/png;base64,...)")
        if media[0] and not media[0].lower().startswith("image/"):
            raise refusal(source, f"a data: URI of {media[0][:60]!r} is not an image")
    elif _URL.match(value):
        raise refusal(source, REMOTE_REFUSED)
    text = "".join(value.split())  # MIME base64 wraps lines
    try:
        data = base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise refusal(source, "the image is not valid base64") from None
    if not data:
        raise refusal(source, "the image is empty")
    return data


def decode(data: bytes, source: Source, room: int = MAX_TOTAL_PIXELS) -> Image:
    """An image file's pixels as RGB (EXIF orientation applied), after its header passed the
    limits (`room`: the pixels the request's other images leave); a 400 naming
    `source.param` for anything unreadable, truncated or too large. CPU-bound: run it in a
    worker thread."""
    try:
        with PIL.Image.open(io.BytesIO(data), formats=FORMATS) as image:
            check_size(image.size, source, room)
            image.load()  # a truncated file fails here
            upright = PIL.ImageOps.exif_transpose(image)
            rgb = upright.convert("RGB")
    except PIL.Image.DecompressionBombError:
        raise refusal(source, f"the image has more than {MAX_PIXELS} pixels") from None
    except PIL.UnidentifiedImageError:
        raise refusal(source, f"not an image xllm reads ({', '.join(FORMATS)})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise refusal(source, f"the image file is malformed or truncated ({e})") from None
    width, height = rgb.size
    pixels = rgb.tobytes()
    digest = hashlib.sha256(f"{width}x{height}:".encode() + pixels).hexdigest()
    return Image(width=width, height=height, rgb=pixels, digest=digest)


def check_size(size: tuple[int, int], source: Source, room: int) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise refusal(source, f"the image is {width} x {height} pixels")
    if width * height > room and room < MAX_PIXELS:
        raise refusal(
            source, f"the request's images have more than {MAX_TOTAL_PIXELS} pixels together"
        )
    if width * height > MAX_PIXELS:
        raise refusal(
            source,
            f"the image is {width} x {height} pixels, more than the {MAX_PIXELS} allowed; "
            "scale it down",
        )
    if max(width, height) > MAX_ASPECT * min(width, height):
        raise refusal(
            source,
            f"the image is {width} x {height} pixels, more than {MAX_ASPECT} times longer "
            "than wide; crop it",
        )


async def read(sources: Sequence[Source], fetch: Fetch | None) -> list[Image]:
    """A request's images, in order: URLs fetched by `fetch` (None: the server fetches
    none), the rest decoded from base64, then all checked and decoded in a worker thread."""
    check_count(sources)
    fetched: dict[int, bytes] = {}
    for i, source in enumerate(sources):
        if source.is_url:
            if fetch is None or not source.value.lower().startswith(("http://", "https://")):
                raise refusal(source, REMOTE_REFUSED)
            fetched[i] = await fetch(source)
    return await asyncio.to_thread(_decode_all, sources, fetched)


def _decode_all(sources: Sequence[Source], fetched: dict[int, bytes]) -> list[Image]:
    out: list[Image] = []
    room = MAX_TOTAL_PIXELS
    for i, source in enumerate(sources):
        image = decode(fetched[i] if i in fetched else encoded(source), source, room)
        room -= image.width * image.height
        out.append(image)
    return out


def refusal(source: Source, why: str) -> InvalidRequest:
    """The 400 for an image, naming the field it came from."""
    return InvalidRequest(f"{source.param}: {why}", param=source.param)
