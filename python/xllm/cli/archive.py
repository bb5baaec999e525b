"""`xllm export MODEL PATH` and `xllm import PATH`: one tar archive per model.

They work on the local store (`XLLM_MODELS_DIR`) and need no server; a running server sees an
imported model at once.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from xllm.models.store import Store, StoredModel


def add_parsers(commands: Any) -> None:
    p = commands.add_parser("export", help="write a model, its Modelfile and metadata to a tar")
    p.add_argument("model")
    p.add_argument("path", type=Path)
    p.set_defaults(func=export)
    p = commands.add_parser("import", help="add a model from an archive made by `xllm export`")
    p.add_argument("path", type=Path)
    p.add_argument("--name", help="store it under this name instead of the archive's")
    p.set_defaults(func=import_)


def _with_store(
    args: argparse.Namespace, work: Callable[[Store], StoredModel], done: Callable[[str], str]
) -> int:
    """Run `work` on the local store; its errors (and the archive file's) as one line."""
    from xllm.config import load_settings
    from xllm.errors import XllmError
    from xllm.models.store import Store

    try:
        model = work(Store(load_settings().models_dir))
    except XllmError as e:
        print(f"Error: {e.message}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"Error: {args.path}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(done(str(model.name)))
    return 0


def export(args: argparse.Namespace) -> int:
    from xllm.models import archive
    from xllm.models.names import parse_name

    return _with_store(
        args,
        lambda store: archive.export(store, parse_name(args.model), args.path),
        lambda name: f"exported '{name}' to {args.path}",
    )


def import_(args: argparse.Namespace) -> int:
    from xllm.models import archive

    return _with_store(
        args,
        lambda store: archive.import_sync(store, args.path, args.name),
        lambda name: f"imported '{name}'",
    )
