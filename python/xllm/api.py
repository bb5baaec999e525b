"""Using xllm as a library: run the server in this process."""

from __future__ import annotations

from typing import Any


def serve(*models: str, **settings: Any) -> None:
    """Serve until SIGINT/SIGTERM, exactly as `xllm serve` does.

    `models` are names (`"smollm2:135m"`) or GGUF paths to load at start; `settings` are the
    `xllm.config.Settings` fields that `xllm serve` has flags for (`host`, `port`, `ctx_size`,
    `parallel`, `threads`, ...), overriding the environment and config.yaml.

        import xllm
        xllm.serve("smollm2:135m", port=8080)
    """
    from xllm.cli.serve import serve_forever

    serve_forever(list(models), settings)
