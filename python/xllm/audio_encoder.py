"""Synthesized speech in the format a client asked for, encoded as it comes.

Every format is 24 kHz mono, as OpenAI's are (a voice's own rate is resampled): `pcm` is the
bare 16-bit little-endian samples, `wav` the same behind a header whose sizes say "unknown"
(0xFFFFFFFF, as streamed WAV has it: decoders read to the end), and the compressed formats
one PyAV (FFmpeg) container per response, fed each piece as it is synthesized, so their
bytes leave piece by piece too. Ogg pages are cut every 100 ms instead of every second, so an
opus stream does not hold back a piece's audio until the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import struct
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import av
import numpy as np

Format = Literal["mp3", "opus", "aac", "flac", "wav", "pcm"]
RATE = 24_000


@dataclass(frozen=True)
class Container:
    content_type: str
    container: str
    codec: str
    options: tuple[tuple[str, str], ...] = ()
    codec_options: tuple[tuple[str, str], ...] = ()


FORMATS: dict[str, Container] = {
    # LAME's `-q 7`, FFmpeg's fast AAC coder and libopus's complexity 5: a third, a half and
    # three quarters of the default's CPU for speech at the same bit rate; the encoder shares
    # the cores with the synthesizer
    "mp3": Container(
        "audio/mpeg", "mp3", "libmp3lame", codec_options=(("compression_level", "7"),)
    ),
    "opus": Container(
        "audio/ogg", "ogg", "libopus", (("page_duration", "100000"),), (("compression_level", "5"),)
    ),
    "aac": Container("audio/aac", "adts", "aac", codec_options=(("aac_coder", "fast"),)),
    "flac": Container("audio/flac", "flac", "flac"),
    "wav": Container("audio/wav", "", ""),
    "pcm": Container("audio/pcm", "", ""),
}
"""Each `response_format`: its content type and how PyAV writes it (`wav` and `pcm` are
written here)."""


def wav_header(rate: int = RATE) -> bytes:
    """A 16-bit mono WAV header for a stream of unknown length."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    return (b"RIFF" + struct.pack("<I", unknown) + b"WAVE" + b"fmt " + struct.pack("<I", 16)
            + fmt + b"data" + struct.pack("<I", unknown))  # fmt: skip


ENCODER_NICENESS = 10
"""How far below the synthesizer the encoding threads run (Linux): encoding a piece only has
to finish before the next one is synthesized, and preempting the voice runner delays every
piece after it. A niced thread still gets a tenth of a busy core, many times what the audio
needs, so it is never starved."""


def _nice_thread() -> None:
    if sys.platform.startswith("linux"):  # per-thread niceness: Linux's, elsewhere a process's
        with contextlib.suppress(OSError):  # a sandbox may refuse it: the default, then
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), ENCODER_NICENESS)


_POOL = ThreadPoolExecutor(thread_name_prefix="xllm-encode", initializer=_nice_thread)


async def off_loop(call: Callable[..., bytes], *args: Any) -> bytes:
    """`call(*args)` (an encoder's `encode` or `finish`) on a niced worker thread."""
    return await asyncio.get_running_loop().run_in_executor(_POOL, call, *args)


class _Sink(io.RawIOBase):
    """Where the container writes: collected until taken."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.data += b
        return len(b)

    def take(self) -> bytes:
        out = bytes(self.data)
        self.data.clear()
        return out


class AudioEncoder:
    """One response's encoder: `encode` each piece of 16-bit mono samples at `rate`, then
    `finish`; each returns the bytes ready to send (maybe none). Not thread-safe; calls may run
    in a worker thread, one at a time."""

    def __init__(self, fmt: Format, rate: int) -> None:
        self.format = fmt
        self.rate = rate
        self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
        self._pts = 0
        self._header = wav_header() if fmt == "wav" else b""
        self._sink = _Sink()
        self._out: Any = None
        self._stream: Any = None
        spec = FORMATS[fmt]
        if spec.container:
            self._out = av.open(self._sink, mode="w", format=spec.container,
                                options=dict(spec.options))  # fmt: skip
            self._stream = self._out.add_stream(
                spec.codec, rate=RATE, layout="mono", options=dict(spec.codec_options)
            )

    def encode(self, samples: bytes) -> bytes:
        if not samples:
            return b""
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(samples, "<i2").reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = self.rate
        frame.pts = self._pts
        self._pts += frame.samples
        return self._write(self._resampler.resample(frame))

    def finish(self) -> bytes:
        """The last bytes (the resampler's and encoder's tails, the container's trailer)."""
        out = self._write(self._resampler.resample(None))
        if self._out is not None:
            for packet in self._stream.encode(None):
                self._out.mux(packet)
            self._out.close()
            out += self._sink.take()
        return out

    def _write(self, frames: list[Any]) -> bytes:
        if self._out is None:
            out = self._header + b"".join(bytes(f.planes[0])[: f.samples * 2] for f in frames)
            self._header = b""
            return out
        for frame in frames:
            for packet in self._stream.encode(frame):
                self._out.mux(packet)
        return self._sink.take()
