"""Image files for tests: real PNGs and JPEGs, and the malformed and hostile ones a server must
refuse (a decompression bomb, an extreme aspect ratio, a truncated file)."""

from __future__ import annotations

import base64
import io
import random
import struct
import zlib

import PIL.Image


def png(color: str = "red", size: tuple[int, int] = (64, 48)) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(out, "PNG")
    return out.getvalue()


def jpeg(color: str = "blue", size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    PIL.Image.new("RGB", size, color).save(out, "JPEG")
    return out.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def data_uri(data: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64,{b64(data)}"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def bomb_png(side: int = 30_000) -> bytes:
    """A valid PNG of side x side black pixels: 1 bit each, so about 100 KB compressed, and
    2.7 GB once decoded to RGB."""
    row = b"\0" * (1 + (side + 7) // 8)  # filter byte, then the packed bits
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    head = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", head) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def noise_png(size: tuple[int, int] = (128, 128), seed: int = 0) -> bytes:
    pixels = random.Random(seed).randbytes(size[0] * size[1] * 3)
    out = io.BytesIO()
    PIL.Image.frombytes("RGB", size, pixels).save(out, "PNG")
    return out.getvalue()


def truncated_png() -> bytes:
    whole = noise_png()
    return whole[: len(whole) // 2]
