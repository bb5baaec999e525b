"""The Whisper runner's decoding of uploads, on real files (speech from espeak-ng, re-encoded
by FFmpeg): the same samples faster-whisper's own `decode_audio` gives, and a 400 naming `file`
for what is not audio, holds none, or runs past the length cap."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
from faster_whisper.audio import decode_audio

from xllm.engine.whisper_runner import SAMPLE_RATE, decode
from xllm.errors import InvalidRequest


@pytest.fixture(scope="module")
def wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audio") / "en.wav"
    subprocess.run(["espeak-ng", "-w", str(path), "Decoding a short sentence."], check=True)
    return path


def test_the_same_samples_as_faster_whisper(wav: Path, tmp_path: Path) -> None:
    flac = tmp_path / "en.flac"
    with av.open(str(wav)) as src, av.open(str(flac), "w") as dst:
        stream = dst.add_stream("flac", rate=22_050)
        assert isinstance(stream, av.AudioStream)
        for frame in src.decode(audio=0):
            for packet in stream.encode(frame):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    for path in (wav, flac):
        data = path.read_bytes()
        mine, theirs = decode(data), decode_audio(io.BytesIO(data))
        assert mine.dtype == np.float32 and np.array_equal(mine, theirs)
        assert 1 < len(mine) / SAMPLE_RATE < 4


def test_what_is_not_audio_is_a_400(wav: Path) -> None:
    data = wav.read_bytes()
    for bad, why in ((b"not audio at all" * 100, "could not be decoded"),
                     (data[:44], "holds no audio")):  # fmt: skip
        with pytest.raises(InvalidRequest, match=why) as e:
            decode(bad)
        assert e.value.param == "file"
    with pytest.raises(InvalidRequest, match=r"longer than 0\.01 minutes"):
        decode(data, max_seconds=0.6)
