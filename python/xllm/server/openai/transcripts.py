"""A transcription's segments in OpenAI's response formats: `json`, `text`, `srt`, `vtt` and
`verbose_json` (the audio's language and duration, segments, and words when asked)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from xllm.engine.protocol import Segment

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
CONTENT_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


def text_of(segments: Sequence[Segment]) -> str:
    """The whole text: the segments' (each starts with its space) joined, trimmed."""
    return "".join(s.text for s in segments).strip()


def usage(duration: float) -> dict[str, Any]:
    """OpenAI's usage of a duration-billed transcription."""
    return {"type": "duration", "seconds": round(duration, 3)}


def _stamp(seconds: float, separator: str) -> str:
    ms = max(0, round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{separator}{ms:03d}"


def srt(segments: Sequence[Segment]) -> str:
    """SubRip: numbered cues from 1, `HH:MM:SS,mmm --> HH:MM:SS,mmm`, a blank line after each."""
    return "".join(
        f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n\n"
        for i, s in enumerate(segments, 1)
    )


def vtt(segments: Sequence[Segment]) -> str:
    """WebVTT: the `WEBVTT` header, then cues `HH:MM:SS.mmm --> HH:MM:SS.mmm`."""
    cues = "".join(
        f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n\n" for s in segments
    )
    return "WEBVTT\n\n" + cues


def verbose(
    task: str,
    language: str,
    duration: float,
    segments: Sequence[Segment],
    words: bool,
    with_segments: bool,
) -> dict[str, Any]:
    """OpenAI's `verbose_json`. `language` is the spoken language's code (`en`, `de`), not
    OpenAI's English name of it."""
    out: dict[str, Any] = {
        "task": task,
        "language": language,
        "duration": round(duration, 3),
        "text": text_of(segments),
    }
    if with_segments:
        out["segments"] = [
            {
                "id": s.id,
                "seek": s.seek,
                "start": round(s.start, 3),
                "end": round(s.end, 3),
                "text": s.text,
                "tokens": list(s.tokens),
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in segments
        ]
    if words:
        out["words"] = [
            {"word": w.word.strip(), "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in segments
            for w in s.words
        ]
    out["usage"] = usage(duration)
    return out
