"""The log file: rotated by size as well as daily, keeping `max_files` old files."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from xllm.log import setup_logging


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers:
        h.close()
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.mark.usefixtures("restore_logging")
def test_rotates_by_size_and_keeps_max_files(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "xllm.log"
    setup_logging("info", str(path), keep_files=3, max_bytes=4000)
    log = logging.getLogger("xllm.test")
    for i in range(200):  # ~100 bytes a line: ~5 rotations' worth
        log.info("line %03d %s", i, "x" * 40)
    files = sorted(p.name for p in path.parent.iterdir())
    assert files[0] == "xllm.log" and len(files) == 4, files  # the live file + 3 kept
    assert all(p.stat().st_size <= 4000 for p in path.parent.iterdir())
    assert "line 199" in path.read_text()
    kept = "".join(p.read_text() for p in path.parent.iterdir())
    assert "line 000" not in kept  # the oldest rotations were deleted
