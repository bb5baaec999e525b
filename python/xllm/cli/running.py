"""`xllm ps`, `xllm stop` and `xllm list`: what the server has loaded and can serve."""

from __future__ import annotations

import argparse
import sys
from datetime import datetime
from typing import Any

from xllm.cli import client
from xllm.cli.humanize import human_bytes, human_time, table


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("ps", help="list loaded models")
    p.set_defaults(func=ps)
    p = commands.add_parser("stop", help="stop a loaded model (aborts its requests, unloads it)")
    p.add_argument("model")
    p.set_defaults(func=stop)
    p = commands.add_parser("list", aliases=["ls"], help="list models the server can serve")
    p.add_argument(
        "--check-updates", action="store_true", help="ask the Hub whether newer revisions exist"
    )
    p.set_defaults(func=list_models)


def _run(fn: Any) -> int:
    try:
        fn()
    except client.NoServer as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    return 0


def _processor(size: int, vram: int) -> str:
    if vram == 0:
        return "100% CPU"
    if vram == size:
        return "100% GPU"
    if vram > size or size == 0:
        return "Unknown"
    cpu = round((size - vram) / size * 100)
    return f"{cpu}%/{100 - cpu}% CPU/GPU"


def ps(args: argparse.Namespace) -> int:
    def show() -> None:
        rows = [["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]]
        now = datetime.now().astimezone()
        models = client.call("GET", "/api/ps")["models"]
        # the LoRA adapters loaded over a model, where any model has some
        adapters = [", ".join(a["name"] for a in m.get("adapters") or ()) for m in models]
        for m in models:
            expires = datetime.fromisoformat(m["expires_at"].replace("Z", "+00:00"))
            delta = (expires - now).total_seconds()
            until = "Stopping..." if delta < 0 else human_time(delta)
            draft = m.get("draft")
            rows.append(
                [
                    f"{m['name']} + draft {draft['name']}" if draft else m["name"],
                    m["digest"][:12],
                    human_bytes(m["size"]),
                    "remote" if _remote(m) else _processor(m["size"], m["size_vram"]),
                    str(m["context_length"]),
                    until,
                ]
            )
        if any(adapters):
            rows = [[*row, a] for row, a in zip(rows, ["ADAPTERS", *adapters], strict=True)]
        print(table(rows))

    return _run(show)


def stop(args: argparse.Namespace) -> int:
    def unload() -> None:
        client.call("POST", "/api/generate", {"model": args.model, "keep_alive": 0})

    return _run(unload)


def list_models(args: argparse.Namespace) -> int:
    def show() -> None:
        rows = [["NAME", "ID", "SIZE", "MODIFIED"] + (["UPDATE"] if args.check_updates else [])]
        now = datetime.now().astimezone()
        for m in client.call("GET", "/api/tags")["models"]:
            modified = datetime.fromisoformat(m["modified_at"].replace("Z", "+00:00"))
            row = [
                m["name"],
                m["digest"][:12],
                "remote" if _remote(m) else human_bytes(m["size"]),
                human_time((modified - now).total_seconds()),
            ]
            if args.check_updates:
                row.append(_update(m["name"]))
            rows.append(row)
        print(table(rows))

    return _run(show)


def _remote(m: dict[str, Any]) -> bool:
    """A model served by a remote endpoint (no size here, no processor)."""
    return bool((m.get("details") or {}).get("format") == "remote")


def _update(name: str) -> str:
    """The Hub's answer for a model in the local store (`XLLM_MODELS_DIR`)."""
    from xllm.config import load_settings
    from xllm.models import updates
    from xllm.models.store import Store

    return updates.check(Store(load_settings().models_dir), name)
