"""A GGUF vocabulary back to Hugging Face's tokenizer.json and tokenizer_config.json.

Each of llama.cpp's tokenizer models becomes the `tokenizers` model it was made from:
- `gpt2`: byte-level BPE with the GGUF's merges; the pre-tokenizer comes from
  `tokenizer.ggml.pre` (PRE_TOKENIZERS: the regular expressions llama.cpp runs for that name);
- `llama` (SentencePiece, as Gemma's): BPE with byte fallback on `▁`-spaced text, its merges
  made from the token scores as Hugging Face's own SentencePiece conversion makes them;
- `bert`: WordPiece, the converter's phantom spaces taken back (`▁x` -> `x`, `x` -> `##x`).
Control tokens become special added tokens, user-defined ones plain added tokens; the
converter's `[PADn]` fillers (unused ids) are left out, as they were absent before.
"""

from __future__ import annotations

from typing import Any

from gguf import TokenType

from xllm.models.convert.meta import Meta
from xllm.models.safetensors import SafetensorsError

_BYTE_LEVEL = {
    "type": "ByteLevel",
    "add_prefix_space": False,
    "trim_offsets": True,
    "use_regex": True,
}
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3 = _QWEN2.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def _split(regex: str) -> list[dict[str, Any]]:
    return [
        {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
        {**_BYTE_LEVEL, "use_regex": False},
    ]


PRE_TOKENIZERS: dict[str, list[dict[str, Any]]] = {
    "default": [_BYTE_LEVEL],
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
    "qwen2": _split(_QWEN2),
    "deepseek-r1-qwen": _split(_QWEN2),
    "llama-bpe": _split(_LLAMA3),
}
"""`tokenizer.ggml.pre` -> the pre-tokenizer steps of a byte-level BPE tokenizer.json."""


def _added(i: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": i,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": not special,
        "special": special,
    }


def _template(first: list[str], last: list[str]) -> dict[str, Any]:
    """A post-processor putting `first` before and `last` after each sequence."""

    def seq(part: str, type_id: int) -> list[dict[str, Any]]:
        return [
            *({"SpecialToken": {"id": t, "type_id": type_id}} for t in first if part == "A"),
            {"Sequence": {"id": part, "type_id": type_id}},
            *({"SpecialToken": {"id": t, "type_id": type_id}} for t in last),
        ]

    return {
        "type": "TemplateProcessing",
        "single": seq("A", 0),
        "pair": seq("A", 0) + seq("B", 1),
        "special_tokens": {},
    }


class _Vocab:
    def __init__(self, m: Meta) -> None:
        self.tokens: list[str] = list(m.get("tokenizer.ggml.tokens", []))
        n = len(self.tokens)
        self.types: list[int] = list(m.get("tokenizer.ggml.token_type", [TokenType.NORMAL] * n))
        self.scores: list[float] = list(m.get("tokenizer.ggml.scores", [0.0] * n))
        self.m = m

    def used(self) -> list[int]:
        return [i for i, t in enumerate(self.types) if t != TokenType.UNUSED]

    def token(self, kind: str) -> str | None:
        i = self.m.token_id(kind)
        return self.tokens[i] if i is not None and 0 <= i < len(self.tokens) else None

    def special(self, processor: dict[str, Any]) -> dict[str, Any]:
        """`processor` with its special tokens' ids filled in."""
        names = {
            s["SpecialToken"]["id"]
            for s in processor["single"] + processor["pair"]
            if "SpecialToken" in s
        }
        ids = {t: i for i, t in enumerate(self.tokens)}
        processor["special_tokens"] = {t: {"id": t, "ids": [ids[t]], "tokens": [t]} for t in names}
        return processor


def _bpe(v: _Vocab) -> dict[str, Any]:
    pre = str(v.m.get("tokenizer.ggml.pre", "default"))
    if pre not in PRE_TOKENIZERS:
        raise SafetensorsError(
            f"tokenizer.ggml.pre {pre!r}: xllm rebuilds only the pre-tokenizers "
            f"{', '.join(PRE_TOKENIZERS)}"
        )
    merges = [m.split(" ", 1) for m in v.m.get("tokenizer.ggml.merges", [])]
    bos = v.token("bos")
    post: dict[str, Any] = (
        v.special(_template([bos], []))
        if v.m.get("tokenizer.ggml.add_bos_token") and bos
        else {**_BYTE_LEVEL, "trim_offsets": False}
    )
    added = [
        _added(i, v.tokens[i], v.types[i] == TokenType.CONTROL)
        for i in v.used()
        if v.types[i] in (TokenType.CONTROL, TokenType.USER_DEFINED)
    ]
    return {
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": PRE_TOKENIZERS[pre]},
        "post_processor": post,
        "decoder": {**_BYTE_LEVEL},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre == "llama-bpe",
            "vocab": {v.tokens[i]: i for i in v.used()},
            "merges": merges,
        },
    }


def spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[list[str]]:
    """Hugging Face's SentencePiece -> BPE conversion: each normal token splits into every pair
    of tokens that make it up, ranked by the token's score (highest first), then by ids."""
    ids = {t: i for i, t in enumerate(tokens) if types[i] in (TokenType.NORMAL, TokenType.BYTE)}
    found: list[tuple[float, int, int, str, str]] = []
    for i, token in enumerate(tokens):
        if types[i] != TokenType.NORMAL:
            continue
        for k in range(1, len(token)):
            left, right = token[:k], token[k:]
            if left in ids and right in ids:
                found.append((-scores[i], ids[left], ids[right], left, right))
    found.sort()
    return [[left, right] for _, _, _, left, right in found]


def _spm(v: _Vocab) -> dict[str, Any]:
    prefix = bool(v.m.get("tokenizer.ggml.add_space_prefix", True))
    space = "\u2581"
    added = []
    for i in v.used():
        if v.types[i] == TokenType.CONTROL:
            added.append(_added(i, v.tokens[i], True))
        elif v.types[i] == TokenType.USER_DEFINED:  # the converter wrote `▁` as a space
            added.append(_added(i, v.tokens[i].replace(" ", space), False))
    normalize = [{"type": "Replace", "pattern": {"String": " "}, "content": space}]
    decode: list[dict[str, Any]] = [
        {"type": "Replace", "pattern": {"String": space}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
    ]
    if prefix:
        normalize.insert(0, {"type": "Prepend", "prepend": space})
        decode.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    bos, eos = v.token("bos"), v.token("eos")
    first = [bos] if v.m.get("tokenizer.ggml.add_bos_token", True) and bos else []
    last = [eos] if v.m.get("tokenizer.ggml.add_eos_token") and eos else []
    vocab = {
        v.tokens[i].replace(" ", space) if v.types[i] == TokenType.USER_DEFINED else v.tokens[i]: i
        for i in v.used()
    }
    return {
        "added_tokens": added,
        "normalizer": {"type": "Sequence", "normalizers": normalize},
        "pre_tokenizer": None,
        "post_processor": v.special(_template(first, last)),
        "decoder": {"type": "Sequence", "decoders": decode},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": v.token("unknown"),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": spm_merges(v.tokens, v.types, v.scores),
        },
    }


def _wordpiece(v: _Vocab) -> dict[str, Any]:
    def word(i: int) -> str:
        token = v.tokens[i]
        if token.startswith("\u2581"):
            return token[1:]
        if v.types[i] == TokenType.CONTROL or (token.startswith("[") and token.endswith("]")):
            return token
        return "##" + token

    cls, sep = v.token("bos") or "[CLS]", v.token("seperator") or "[SEP]"
    return {
        "added_tokens": [
            _added(i, v.tokens[i], True) for i in v.used() if v.types[i] == TokenType.CONTROL
        ],
        # llama.cpp's WPM tokenizer lowercases and splits CJK characters, as this normalizer does
        "normalizer": {
            "type": "BertNormalizer",
            "clean_text": True,
            "handle_chinese_chars": True,
            "strip_accents": None,
            "lowercase": True,
        },
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": v.special(_template([cls], [sep])),
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "model": {
            "type": "WordPiece",
            "unk_token": v.token("unknown") or "[UNK]",
            "continuing_subword_prefix": "##",
            "max_input_chars_per_word": 100,
            "vocab": {word(i): i for i in v.used()},
        },
    }


_MODELS = {"gpt2": _bpe, "llama": _spm, "bert": _wordpiece}


def files(m: Meta) -> dict[str, Any]:
    """tokenizer.json and tokenizer_config.json (special tokens, add_bos/add_eos, the chat
    template) of the GGUF's vocabulary."""
    model = str(m.get("tokenizer.ggml.model", ""))
    if model not in _MODELS:
        raise SafetensorsError(
            f"tokenizer model {model!r} cannot be rebuilt; xllm rebuilds {', '.join(_MODELS)}"
        )
    v = _Vocab(m)
    spec = {"version": "1.0", "truncation": None, "padding": None, **_MODELS[model](v)}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
    }
    if (ctx := m.of_arch("context_length")) is not None:
        config["model_max_length"] = int(ctx)
    for field, kind in (
        ("bos_token", "bos"),
        ("eos_token", "eos"),
        ("unk_token", "unknown"),
        ("pad_token", "padding"),
        ("sep_token", "seperator"),
        ("cls_token", "cls"),
        ("mask_token", "mask"),
    ):
        if (token := v.token(kind)) is not None:
            config[field] = token
    for field in ("add_bos_token", "add_eos_token"):
        if (value := m.get(f"tokenizer.ggml.{field}")) is not None:
            config[field] = bool(value)
    if (template := m.get("tokenizer.chat_template")) is not None:
        config["chat_template"] = str(template)
    config["added_tokens_decoder"] = {
        str(a["id"]): {
            k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
        }
        for a in spec["added_tokens"]
    }
    return {"tokenizer.json": spec, "tokenizer_config.json": config}
