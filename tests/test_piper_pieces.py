"""How the Piper engine cuts a text's phonemes into pieces to stream, and its one loudness per
utterance (engine/piper_voice.py); phonemes here are what espeak-ng gives: characters, with
" " between words and the punctuation kept."""

from __future__ import annotations

import numpy as np

from xllm.engine.piper_voice import FIRST_PIECE, PIECE, Loudness, pieces


def phonemes(text: str) -> list[str]:
    return list(text)


def test_short_sentences_are_a_piece_each() -> None:
    out = pieces([phonemes("hello there."), phonemes("bye now!")])
    assert ["".join(p) for p in out] == ["hello there.", "bye now!"]


def test_a_long_first_sentence_is_cut_at_a_clause_mark_early() -> None:
    clause = "word " * 8 + "end,"  # 44 phonemes
    sentence = phonemes(" ".join([clause] * 6) + ".")
    out = pieces([sentence])
    assert len(out[0]) <= FIRST_PIECE and "".join(out[0]).endswith(",")
    assert all(len(p) <= PIECE for p in out)
    assert all("".join(p).endswith((",", ".")) for p in out)  # never inside a clause
    assert "".join("".join(p) for p in out).replace(" ", "") == "".join(sentence).replace(" ", "")


def test_a_clause_longer_than_a_piece_is_cut_between_words() -> None:
    sentence = phonemes(" ".join(["abcdefghi"] * 100) + ".")  # 1,000 phonemes, no clause mark
    out = pieces([sentence])
    assert len(out) >= 1000 // PIECE
    assert all(len(p) <= PIECE for p in out)
    assert all(p[0] != " " for p in out)  # no piece starts with a pause
    words = [w for p in out for w in "".join(p).split()]
    assert words == ["abcdefghi"] * 99 + ["abcdefghi."]


def test_a_piece_never_spans_two_sentences_and_blank_ones_go() -> None:
    out = pieces([phonemes("a."), [" "], phonemes("b.")])
    assert ["".join(p) for p in out] == ["a.", "b."]


def test_one_gain_per_utterance_and_no_clipping() -> None:
    loud = Loudness()
    quiet = np.full(100, 0.5, np.float32)
    first = np.frombuffer(loud.apply(quiet), "<i2")
    assert abs(first.max() / 32767 - 0.95) < 0.01  # the first piece's peak sets the gain
    second = np.frombuffer(loud.apply(quiet * 0.5), "<i2")
    assert abs(second.max() / 32767 - 0.475) < 0.01  # the same gain: quieter stays quieter
    third = np.frombuffer(loud.apply(np.full(100, 0.9, np.float32)), "<i2")
    assert third.max() <= 32767 * 0.951  # would clip at that gain: scaled down to fit
