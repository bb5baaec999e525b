"""A Piper voice as its runner uses it: text cut into pieces small enough to stream, each
synthesized to 16-bit samples at one loudness per utterance.

Piper synthesizes a sentence at a time. The text is phonemized whole (espeak-ng reads numbers
and abbreviations in context), then a sentence longer than `PIECE` phonemes is cut at its
clause marks, and a clause still longer at its spaces; the first piece of an utterance is kept
under `FIRST_PIECE` where a clause mark allows, so the first audio comes quickly.

Piper's own peak normalization is per sentence, so loudness would jump from piece to piece:
instead the first piece's peak sets one gain for the utterance, and a later piece that would
clip at that gain is scaled down just enough.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from xllm.errors import InvalidRequest
from xllm.models import speech

CLAUSE_MARKS = frozenset(",;:")
"""Phonemes espeak-ng keeps for a pause inside a sentence."""
FIRST_PIECE = 60
"""Phonemes of an utterance's first piece where a clause mark allows: about 3 s of speech,
synthesized in a fraction of that."""
PIECE = 200
"""Phonemes of any other piece: about 12 s of speech."""
PEAK = 0.95
MAX_GAIN = 8.0
"""A near-silent first piece must not set a gain that makes the rest noise."""


def pieces(sentences: Sequence[Sequence[str]]) -> list[list[str]]:
    """Sentences of phonemes as pieces to synthesize one at a time, in order (a piece never
    spans two sentences)."""
    out: list[list[str]] = []
    for sentence in sentences:
        units: list[list[str]] = []
        for clause in _cut(sentence, CLAUSE_MARKS):
            units.extend(_cut(clause, frozenset(" ")) if len(clause) > PIECE else [clause])
        current: list[str] = []
        for unit in units:
            limit = FIRST_PIECE if not out else PIECE
            if current and len(current) + len(unit) > limit:
                out.append(current)
                current = []
            current.extend(unit if current else _lstrip(unit))
        if current:
            out.append(current)
    return [p for p in out if any(ph.isalpha() for ph in p)]  # not pauses alone


def _cut(phonemes: Sequence[str], marks: frozenset[str]) -> list[list[str]]:
    """`phonemes` cut after each of `marks` (kept with what it ends)."""
    out: list[list[str]] = [[]]
    for ph in phonemes:
        out[-1].append(ph)
        if ph in marks:
            out.append([])
    return [p for p in out if p]


def _lstrip(phonemes: list[str]) -> list[str]:
    i = 0
    while i < len(phonemes) and phonemes[i] == " ":
        i += 1
    return phonemes[i:]


@dataclass
class Loudness:
    """One gain for a whole utterance (see the module's docstring)."""

    gain: float | None = None

    def apply(self, audio: np.ndarray[Any, Any]) -> bytes:
        """Float samples in [-1, 1] as 16-bit little-endian samples."""
        peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
        if self.gain is None and peak > 1e-4:
            self.gain = min(PEAK / peak, MAX_GAIN)
        gain = self.gain or 1.0
        if peak * gain > 1.0:
            gain = PEAK / peak
        samples = np.clip(audio * gain * 32767.0, -32767, 32767).astype("<i2")
        return samples.tobytes()


@dataclass
class Voice:
    """A loaded Piper voice (onnxruntime on `threads` threads, CUDA where asked and present)."""

    path: Path
    threads: int
    cuda: bool = False
    piper: Any = field(init=False)

    def __post_init__(self) -> None:
        import json

        import onnxruntime
        from piper import PiperVoice
        from piper.config import PiperConfig

        onnx, config = speech.voice_files(self.path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # idle workers sleep instead of spinning: the server encodes each piece while the next
        # is synthesized, and spinning workers take the cores it needs between operators
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        providers = ["CPUExecutionProvider"]
        if self.cuda and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        session = onnxruntime.InferenceSession(str(onnx), options, providers=providers)
        with config.open(encoding="utf-8") as f:
            self.piper = PiperVoice(session=session, config=PiperConfig.from_dict(json.load(f)))
        self.name = onnx.name.removesuffix(".onnx")
        self.speakers: dict[str, int] = dict(self.piper.config.speaker_id_map)

    @property
    def sample_rate(self) -> int:
        return int(self.piper.config.sample_rate)

    @property
    def hop_length(self) -> int:
        return int(self.piper.config.hop_length)

    @property
    def voices(self) -> list[str]:
        """The names a request's `voice` may take: the voice's own (its default speaker),
        then its speakers'."""
        return [self.name, *(s for s in self.speakers if s != self.name)]

    def speaker(self, voice: str | None) -> int | None:
        """The speaker id of a voice name (a name `voices` has), None for the default."""
        return None if voice is None or voice == self.name else self.speakers[voice]

    def plan(self, text: str) -> list[list[int]]:
        """The phoneme ids of each piece of `text`; a 400 if it has nothing to say."""
        ids = [self.piper.phonemes_to_ids(p) for p in pieces(self.piper.phonemize(text))]
        if not ids:
            raise InvalidRequest("input: the text has nothing to speak (no words)", param="input")
        return ids

    def synthesize(self, ids: list[int], speaker: int | None, speed: float) -> Any:
        """Float samples of one piece, `speed` times the voice's natural pace."""
        from piper.config import SynthesisConfig

        scale = self.piper.config.length_scale / speed
        config = SynthesisConfig(speaker_id=speaker, length_scale=scale, normalize_audio=False)
        return self.piper.phoneme_ids_to_audio(ids, config)

    def frames(self, samples: int) -> int:
        """Decoder frames behind `samples` samples (what usage counts as output tokens)."""
        return math.ceil(samples / self.hop_length)
