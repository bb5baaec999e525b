"""Speech models as files: Whisper in CTranslate2 form (what faster-whisper loads) and Piper
voices, and what `show` and `list` tell about them without loading them.

A Whisper model is a folder: `model.bin` (CTranslate2's binary: a version, the spec's name,
then every variable's name, shape, type and bytes), `config.json`, `tokenizer.json` and a
vocabulary. Its facts come from the model.bin header (the variables' data is skipped, never
read), the vocabulary's size (51,864 entries for English-only models, more for multilingual
ones) and the tokenizer's language tokens. A Piper voice is `<voice>.onnx` and its
`<voice>.onnx.json` (sample rate, language, speakers).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from xllm.errors import InvalidRequest
from xllm.models.summary import Summary

WHISPER_FILES = frozenset(
    {"model.bin", "config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json",
     "preprocessor_config.json"}
)  # fmt: skip
"""Every file of a CTranslate2 Whisper folder (faster-whisper reads these and no other)."""
WHISPER_SAMPLE_RATE = 16_000
ENGLISH_VOCAB = 51_864
"""The vocabulary size of English-only Whisper models; multilingual ones have more."""
_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,200}\.onnx")
"""A voice's model file: top level, a plain name (no `/`, cannot start with `.`)."""
_LANGUAGE = re.compile(r"<\|([a-z]{2,3}(?:_[a-z]+)?)\|>")
_CT2_TYPES = ("F32", "INT8", "INT16", "INT32", "F16", "BF16")
"""CTranslate2's DataType enum, in order (include/ctranslate2/types.h)."""
MAX_JSON = 16 << 20
MAX_VARIABLES = 100_000


class SpeechModelError(InvalidRequest):
    """Speech model files that are not what they claim to be."""


def is_whisper_file(name: str) -> bool:
    return name in WHISPER_FILES


def is_voice_file(name: str) -> bool:
    """A voice's `.onnx` or its `.onnx.json`: a fixed shape, so none can leave the folder."""
    return _VOICE.fullmatch(name.removesuffix(".json")) is not None


def whisper_complete(names: Mapping[str, object] | set[str] | frozenset[str]) -> bool:
    """Whether the names make a whole Whisper folder (faster-whisper would otherwise fetch
    the tokenizer from the Hub)."""
    return {"model.bin", "config.json", "tokenizer.json"} <= set(names) and bool(
        {"vocabulary.txt", "vocabulary.json"} & set(names)
    )


def voice_complete(names: Mapping[str, object] | set[str] | frozenset[str]) -> bool:
    """Exactly one voice: its `.onnx` and `.onnx.json`."""
    onnx = [n for n in names if n.endswith(".onnx")]
    return len(onnx) == 1 and f"{onnx[0]}.json" in names and len(set(names)) == 2


def _json(path: Path) -> Any:
    with path.open("rb") as f:
        raw = f.read(MAX_JSON + 1)
    if len(raw) > MAX_JSON:
        raise SpeechModelError(f"{path.name} is larger than {MAX_JSON} bytes")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise SpeechModelError(f"{path.name} is not JSON") from None


def _unpack(f: BinaryIO, fmt: str, what: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    data = f.read(size)
    if len(data) < size:
        raise SpeechModelError(f"model.bin ends inside {what}")
    return struct.unpack(fmt, data)


def _string(f: BinaryIO, what: str) -> str:
    (length,) = _unpack(f, "<H", what)
    data = f.read(length)
    if len(data) < length or not data.endswith(b"\0"):
        raise SpeechModelError(f"model.bin has a malformed {what}")
    return data[:-1].decode("utf-8", "replace")


def read_ctranslate2(path: Path) -> tuple[str, Counter[str]]:
    """(spec name, element count per data type) from a CTranslate2 model.bin; the variables'
    data is seeked over. SpeechModelError for a file that is not one."""
    size = path.stat().st_size
    with path.open("rb") as f:
        (version,) = _unpack(f, "<I", "the header")
        if not 1 <= version <= 100:
            raise SpeechModelError(f"model.bin is not a CTranslate2 model (version {version})")
        spec = _string(f, "spec name") if version >= 2 else "unknown"
        if version >= 2:
            _unpack(f, "<I", "the spec revision")
        (count,) = _unpack(f, "<I", "the variable count")
        if count > MAX_VARIABLES:
            raise SpeechModelError(f"model.bin claims {count} variables")
        by_type: Counter[str] = Counter()
        for _ in range(count):
            name = _string(f, "variable name")
            (rank,) = _unpack(f, "<B", "a rank")
            dims = _unpack(f, f"<{rank}I", "a shape")
            (kind,) = _unpack(f, "<B", "a data type") if version >= 4 else (0,)
            (nbytes,) = _unpack(f, "<I", "a byte count")
            if kind >= len(_CT2_TYPES) or f.seek(nbytes, 1) > size:
                raise SpeechModelError(f"model.bin: variable {name[:100]!r} is malformed")
            by_type[_CT2_TYPES[kind]] += math.prod(dims)
    return spec, by_type


def _vocab_size(files: Mapping[str, Path]) -> int:
    if "vocabulary.json" in files:
        vocab = _json(files["vocabulary.json"])
        return len(vocab) if isinstance(vocab, list) else 0
    with files["vocabulary.txt"].open("rb") as f:
        return sum(1 for _ in f)


def _languages(files: Mapping[str, Path], config: dict[str, Any]) -> list[str]:
    """The language codes of the tokenizer's `<|xx|>` tokens that config.json's `lang_ids`
    names."""
    tokenizer = _json(files["tokenizer.json"])
    added = tokenizer.get("added_tokens") if isinstance(tokenizer, dict) else None
    ids = set(config.get("lang_ids") or [])
    out = []
    for token in added if isinstance(added, list) else []:
        if not isinstance(token, dict) or token.get("id") not in ids:
            continue
        m = _LANGUAGE.fullmatch(str(token.get("content", "")))
        if m:
            out.append(m.group(1))
    return out


def summarize_whisper(files: Mapping[str, Path]) -> Summary:
    """The facts of a CTranslate2 Whisper folder given as name -> file."""
    if not whisper_complete(files):
        raise SpeechModelError(
            "a Whisper model needs model.bin, config.json, tokenizer.json and "
            "vocabulary.txt (or vocabulary.json)"
        )
    config = _json(files["config.json"])
    if not isinstance(config, dict):
        raise SpeechModelError("config.json is not a JSON object")
    spec, by_type = read_ctranslate2(files["model.bin"])
    if spec != "WhisperSpec":
        raise SpeechModelError(f"model.bin is a CTranslate2 {spec}, not a Whisper model")
    multilingual = _vocab_size(files) > ENGLISH_VOCAB
    languages = _languages(files, config) if multilingual else ["en"]
    params = sum(by_type.values())
    return Summary(
        architecture="whisper",
        parameter_count=params,
        quantization=by_type.most_common(1)[0][0] if by_type else "unknown",
        context_length=0,
        embedding_length=0,
        block_count=0,
        capabilities=["transcription"],
        chat_template=None,
        license=None,
        model_info={
            "general.architecture": "whisper",
            "general.parameter_count": params,
            "whisper.multilingual": multilingual,
            "whisper.languages": languages,
            "whisper.sample_rate": WHISPER_SAMPLE_RATE,
        },
        format="ctranslate2",
    )


def summarize_voice(files: Mapping[str, Path]) -> Summary:
    """The facts of a Piper voice given as name -> file (its .onnx and .onnx.json)."""
    if not voice_complete(files):
        raise SpeechModelError("a Piper voice is one <voice>.onnx and its <voice>.onnx.json")
    onnx = next(n for n in files if n.endswith(".onnx"))
    with files[onnx].open("rb") as f:
        if f.read(1) != b"\x08":  # an ONNX ModelProto starts with its ir_version field
            raise SpeechModelError(f"{onnx} is not an ONNX model")
    config = _json(files[f"{onnx}.json"])
    audio = config.get("audio") if isinstance(config, dict) else None
    rate = audio.get("sample_rate") if isinstance(audio, dict) else None
    if not isinstance(rate, int) or isinstance(rate, bool) or not 0 < rate <= 192_000:
        raise SpeechModelError(f"{onnx}.json has no valid audio.sample_rate")
    assert isinstance(config, dict) and isinstance(audio, dict)
    language = config.get("language")
    code = language.get("code") if isinstance(language, dict) else None
    espeak = config.get("espeak")
    speakers = config.get("num_speakers")
    info: dict[str, Any] = {
        "general.architecture": "piper",
        "general.parameter_count": 0,
        "piper.voice": onnx.removesuffix(".onnx"),
        "piper.sample_rate": rate,
        "piper.languages": [code] if isinstance(code, str) else [],
        "piper.speakers": speakers if isinstance(speakers, int) else 1,
    }
    if isinstance(audio.get("quality"), str):
        info["piper.quality"] = audio["quality"]
    if isinstance(espeak, dict) and isinstance(espeak.get("voice"), str):
        info["piper.espeak_voice"] = espeak["voice"]
    return Summary(
        architecture="piper",
        parameter_count=0,
        quantization="unknown",
        context_length=0,
        embedding_length=0,
        block_count=0,
        capabilities=["speech"],
        chat_template=None,
        license=None,
        model_info=info,
        format="piper",
    )


def voice_files(path: Path) -> tuple[Path, Path]:
    """(the .onnx, its .onnx.json) of a voice given as its .onnx file or as a folder holding
    one voice (a stored voice's folder)."""
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.name.endswith(".onnx"))
        if len(found) != 1:
            raise SpeechModelError(f"{path} holds {len(found)} .onnx voices, not one")
        path = found[0]
    return path, path.with_name(path.name + ".json")
