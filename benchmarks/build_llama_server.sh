#!/usr/bin/env bash
# Builds llama-server and llama-perplexity from the llama.cpp that the pinned llama-cpp-python
# vendors, so the benchmarks compare xllm with exactly the same llama.cpp. Cached outside the
# repository; a no-op when the binaries exist. Prints llama-server's path (llama-perplexity is
# beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
cache="${XLLM_BENCH_CACHE:-$HOME/.cache/xllm-bench}/llama-cpp-python-$version"
bin="$cache/build/bin/llama-server"
args=$(bash packaging/ggml_cmake_args.sh)  # a cached build made with other arguments is redone
if [ ! -x "$bin" ] || [ ! -x "$cache/build/bin/llama-perplexity" ] \
    || [ "$(cat "$cache/build/ggml_cmake_args" 2>/dev/null)" != "$args" ]; then
    mkdir -p "$cache"
    if [ ! -d "$cache/src" ]; then
        python3 -m pip download --quiet --no-binary llama-cpp-python --no-deps \
            "llama-cpp-python==$version" -d "$cache/sdist" >&2
        mkdir -p "$cache/src"
        tar -xzf "$cache"/sdist/llama_cpp_python-"$version".tar.gz -C "$cache/src" --strip-components=1
    fi
    cmake=$(command -v cmake || true)
    if [ -z "$cmake" ]; then  # no system cmake: the PyPI wheel, in a venv of its own
        python3 -m venv "$cache/tools" && "$cache/tools/bin/pip" install --quiet cmake >&2
        cmake="$cache/tools/bin/cmake"
    fi
    "$cmake" -S "$cache/src/vendor/llama.cpp" -B "$cache/build" -DCMAKE_BUILD_TYPE=Release \
        -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF $args >&2
    "$cmake" --build "$cache/build" --target llama-server llama-perplexity -j "$(nproc)" >&2
    echo "$args" > "$cache/build/ggml_cmake_args"
fi
echo "$bin"
