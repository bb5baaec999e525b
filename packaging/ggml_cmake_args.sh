#!/usr/bin/env bash
# Prints the CMake arguments to build llama.cpp (and stable-diffusion.cpp's ggml) for this CPU:
# nothing where ggml's own `-march=native` build is safe, else a build for the same instruction
# sets without AMX. ggml's AMX kernels (used from 2 tokens a batch up) die with SIGILL at their
# first tile load in virtual machines that advertise AMX (seen in a Firecracker VM on a
# Sapphire Rapids host: plain AMX code runs there, ggml's does not, llama-server's included).
#   CMAKE_ARGS="$(bash packaging/ggml_cmake_args.sh)" pip install --no-cache-dir --force-reinstall llama-cpp-python
set -euo pipefail
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
has amx_int8 || has amx_tile || exit 0
args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
on() { if has "$1"; then args+=" -D$2=ON"; else args+=" -D$2=OFF"; fi; }
on sse4_2 GGML_SSE42
on avx GGML_AVX
on avx2 GGML_AVX2
on fma GGML_FMA
on f16c GGML_F16C
on bmi2 GGML_BMI2
on avx_vnni GGML_AVX_VNNI
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
    args+=" -DGGML_AVX512=ON"
    on avx512vbmi GGML_AVX512_VBMI
    on avx512_vnni GGML_AVX512_VNNI
    on avx512_bf16 GGML_AVX512_BF16
fi
echo "$args"
