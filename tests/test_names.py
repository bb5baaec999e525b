"""Model names and digests: one parser, and nothing it accepts addresses a file outside the store.

RELIABILITY item 7: handcrafted hostile names plus >= 10,000 generated ones. Every name either
fails with a 400 or maps to exactly manifests/<host>/<namespace>/<model>/<tag> inside the store.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.errors import InvalidRequest
from xllm.models.names import ModelName, canonical, parse_digest, parse_name
from xllm.models.store import Store

HEX = "0123456789abcdef" * 4

VALID = [
    ("llama3.2", ("registry.ollama.ai", "library", "llama3.2", "latest"), "llama3.2:latest"),
    ("llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ("library/llama3.2:1b", ("registry.ollama.ai", "library", "llama3.2", "1b"), "llama3.2:1b"),
    ("registry.ollama.ai/library/qwen:0.5b", ("registry.ollama.ai", "library", "qwen", "0.5b"), "qwen:0.5b"),
    ("user/model:v1", ("registry.ollama.ai", "user", "model", "v1"), "user/model:v1"),
    ("example.com:5000/ns/m:t", ("example.com:5000", "ns", "m", "t"), "example.com:5000/ns/m:t"),
    ("hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M",
     ("hf.co", "bartowski", "Llama-3.2-1B-Instruct-GGUF", "Q4_K_M"),
     "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"),
    ("huggingface.co/org/repo", ("hf.co", "org", "repo", "latest"), "hf.co/org/repo:latest"),
    ("  smollm2:135m  ", ("registry.ollama.ai", "library", "smollm2", "135m"), "smollm2:135m"),
    ("a" * 80 + ":" + "b" * 80, ("registry.ollama.ai", "library", "a" * 80, "b" * 80), "a" * 80 + ":" + "b" * 80),
    ("m:_tag", ("registry.ollama.ai", "library", "m", "_tag"), "m:_tag"),
]  # fmt: skip


@pytest.mark.parametrize(("text", "parts", "display"), VALID)
def test_valid_names(text: str, parts: tuple[str, ...], display: str) -> None:
    name = parse_name(text)
    assert name.parts == parts
    assert name.display == display
    assert parse_name(name.display) == name  # the display form parses back to the same name


HOSTILE = [
    "", " ", "../../etc/passwd", "..", "../x", "x/..", "x/../y", "a..b", "..%2f..%2fetc",
    "%2e%2e/%2e%2e/etc", "%2e%2e%2f", "/etc/passwd", "/abs:tag", "a/", "/a", "a//b", "a/b/c/d",
    "a/b/c/d:e", "\\\\server\\share", "..\\..\\windows", "C:\\Windows\\system32", "C:/x", "C:",
    "x\0y", "x:\0", "model:t\nag", "mo\ndel", "mo del", "model:ta g", "model:", ":tag", "model::tag",
    "model:tag:more", "model:../x", "model:..", "model:.hidden", "model@sha256:" + HEX,
    "a" * 81, "m:" + "t" * 81, "n" * 81 + "/m", "h" * 351 + "/n/m", "\uff4dodel", "model\uff0e\uff0e",
    "\uff0e\uff0e/\uff0e\uff0e/etc", "hf.co/user/../../x", "hf.co/repo", "hf.co/../x/y",
    "hf.co/org/repo:../../x", "hf.co/./x/y", "-model", ".model", "_model", "model/-x", "host:99999999/a/b",
    "host:/a/b", "a:b/c", "sha256:../x", "registry.ollama.ai/library/../x", "~/x", "$HOME/x",
    "model;rm -rf", "model|x", "model`x`", "model$(x)", "model?x", "model#x", "model*", "model%00",
]  # fmt: skip


@pytest.mark.parametrize("text", HOSTILE)
def test_hostile_names_are_rejected(text: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_name(text)
    assert e.value.status == 400


def test_non_strings_are_rejected() -> None:
    for value in (None, 5, ["a"], {"a": 1}):
        with pytest.raises(InvalidRequest):
            parse_name(value)  # type: ignore[arg-type]


def _confined(name: ModelName, store: Store) -> None:
    """The invariant of Ollama's FuzzName, plus: the manifest path stays in the store."""
    assert all(
        ".." not in p and "/" not in p and "\\" not in p and "\0" not in p for p in name.parts
    )
    assert all(0 < len(p) <= 80 for p in name.parts[1:]) and 0 < len(name.host) <= 350
    path = store.manifest_path(name)
    assert path.relative_to(store.manifests_dir).parts == name.parts
    assert os.path.commonpath([path.resolve(), store.root.resolve()]) == str(store.root.resolve())


_alphabet = st.sampled_from([*"abcXYZ019_-.:/\\%@~ \t\n\0", "..", "%2e", "\uff0e", "\u00e9", "../"])


@settings(max_examples=10_000, deadline=None)
@given(st.lists(_alphabet, max_size=40).map("".join))
def test_generated_names_are_rejected_or_confined(text: str) -> None:
    store = Store(Path("/nonexistent/xllm-store"))
    try:
        name = parse_name(text)
    except InvalidRequest:
        return
    _confined(name, store)
    assert parse_name(name.display) == name


@settings(max_examples=2_000, deadline=None)
@given(st.text(max_size=120))
def test_arbitrary_text_is_rejected_or_confined(text: str) -> None:
    store = Store(Path("/nonexistent/xllm-store"))
    try:
        name = parse_name(text)
    except InvalidRequest:
        return
    _confined(name, store)


def test_canonical_applies_aliases() -> None:
    assert canonical("smollm2") == "smollm2:135m"
    assert canonical("library/smollm2:latest") == "smollm2:135m"
    assert canonical("x") == "x:latest"


@pytest.mark.parametrize(
    ("text", "want"),
    [(f"sha256:{HEX}", f"sha256:{HEX}"), (f"sha256-{HEX}", f"sha256:{HEX}"),
     (f"sha256:{HEX.upper()}", f"sha256:{HEX}")],
)  # fmt: skip
def test_valid_digests(text: str, want: str) -> None:
    assert parse_digest(text) == want


@pytest.mark.parametrize(
    "text",
    ["", "sha256:", f"sha256:{HEX[:63]}", f"sha256:{HEX}0", f"sha512:{HEX}", f"SHA256:{HEX}",
     f"sha256:{HEX[:62]}..", "sha256:../x", f"sha256:{HEX}/../x", f"sha256:{HEX}\n",
     f"sha256-{HEX}-partial", f"sha256:{HEX[:63]}g", f" sha256:{HEX}", None, 5],
)  # fmt: skip
def test_bad_digests(text: object) -> None:
    with pytest.raises(InvalidRequest):
        parse_digest(text)


@settings(max_examples=2_000, deadline=None)
@given(st.text(alphabet="sha256:-0123456789abcdef./\\\0", max_size=80))
def test_generated_digests_map_to_blob_files(text: str) -> None:
    store = Store(Path("/nonexistent/xllm-store"))
    try:
        path = store.blob_path(text)
    except InvalidRequest:
        return
    assert path.parent == store.blobs_dir and len(path.name) == 71
