"""Quantizing a GGUF with libllama's `llama_model_quantize` (every type llama-quantize offers).

It runs in a child process (`python -m xllm.models.convert.quantize SRC DST TYPE THREADS`): a
GGML_ABORT inside llama.cpp ends the process it runs in, and that must not be the CLI or the
server. The child passes llama.cpp's log through; its `[  n/ N]` lines are the progress.
"""

from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from xllm.errors import InvalidRequest

_PREFIX = "LLAMA_FTYPE_MOSTLY_"
_PROGRESS = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]")
"""llama.cpp's line for each tensor it quantizes: `[  12/ 101] blk.1.attn_q.weight - ...`."""
_FAILED = "failed to quantize: "
"""What `llama_model_quantize` logs before the reason it gives up (an exception it caught)."""


class QuantizeError(InvalidRequest):
    """llama.cpp could not quantize the model (one line of its log says why): the model given
    was not one it quantizes (already quantized, an unsupported type for its shapes)."""


def types() -> dict[str, int]:
    """Quantization type name (`Q4_K_M`) -> libllama's file type, as llama.h lists them."""
    import llama_cpp

    return {
        name.removeprefix(_PREFIX): int(getattr(llama_cpp, name))
        for name in dir(llama_cpp)
        if name.startswith(_PREFIX)
    }


def file_type(name: str) -> int:
    known = types()
    if name.upper() not in known:
        raise InvalidRequest(
            f"quantize: unknown type {name!r}; choose one of {', '.join(sorted(known))}",
            param="quantize",
        )
    return known[name.upper()]


def quantize(
    src: Path, dst: Path, kind: str, progress: Callable[[int, int], None] | None = None
) -> None:
    """Quantize `src` to `dst` as `kind` in a child process, hearing (tensors done, total)."""
    ftype = file_type(kind)
    tmp = dst.with_name(f".{dst.name}.partial")
    threads = str(max(len(os.sched_getaffinity(0)), 1))
    cmd = [sys.executable, "-m", __name__, str(src), str(tmp), str(ftype), threads]
    # no backtrace after a GGML_ABORT: its message stays the last line (and no debugger starts)
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}
    tail: deque[str] = deque(maxlen=8)
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              errors="replace", env=env) as child:  # fmt: skip
            assert child.stdout is not None
            for line in child.stdout:
                tail.append(line.rstrip())
                if (m := _PROGRESS.match(line)) and progress is not None:
                    progress(int(m[1]), int(m[2]))
        if child.returncode != 0 or not tmp.is_file():
            why = reason(tail, child.returncode)
            raise QuantizeError(
                f"llama.cpp could not quantize the model to {kind}: {why}", param="quantize"
            )
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def reason(tail: Sequence[str], returncode: int) -> str:
    """One line of why the child failed: the reason llama.cpp gave up with, else (an abort, a
    crash) its last line and the signal that ended it."""
    said = "\n".join(tail)
    if _FAILED in said:  # its message may start on the next line ("\nUnsupported tensor size")
        after = said.rsplit(_FAILED, 1)[1].strip()
        return after.splitlines()[0] if after else "no reason given"
    last = next((x.strip() for x in reversed(tail) if x.strip()), "no output")
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
        return f"{last} ({name or f'signal {-returncode}'})"
    return last


def _child(src: str, dst: str, ftype: int, threads: int) -> int:
    import llama_cpp as lc

    def log(level: int, text: bytes, data: ctypes.c_void_p) -> None:
        sys.stdout.write(text.decode("utf-8", "replace"))
        sys.stdout.flush()

    callback = lc.llama_log_callback(log)  # kept referenced while llama.cpp may call it
    lc.llama_log_set(callback, ctypes.c_void_p())
    lc.llama_backend_init()
    params = lc.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    return int(lc.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params)))


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
