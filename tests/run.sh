#!/usr/bin/env bash
# The test command: static checks, Rust tests, then the Python suite against real models.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
set -x
cargo fmt --check
cargo clippy --all-targets -- -D warnings
cargo clippy --all-targets --features python -- -D warnings
# one test at a time: the batcher's auto-speculation tests time a fake backend's decodes
cargo test --quiet -- --test-threads=1
ruff check python tests benchmarks
ruff format --check python tests benchmarks
mypy
python -m mypy.stubtest xllm._core
python -m pytest -q "$@"
