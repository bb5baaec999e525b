"""`xllm list --check-updates`: whether the Hub has a newer revision of a pulled model."""

from __future__ import annotations

import json

from xllm.errors import InvalidRequest
from xllm.models.names import parse_name
from xllm.models.store import Store

UP_TO_DATE = "up to date"
AVAILABLE = "available"
UNKNOWN = "unknown"


def check(store: Store, name: str) -> str:
    """`available`, `up to date`, `unknown` (the Hub did not answer) or `-` (not from the Hub).

    A model pulled from the Hub records its repo and revision in its config blob.
    """
    try:
        model = store.get(parse_name(name))
    except InvalidRequest:
        return "-"
    if model is None:
        return "-"
    try:
        config = json.loads(store.blob_path(model.manifest.config.digest).read_bytes())
        source = config["source"]
        endpoint, repo, revision = source["hub"], source["repo"], source["revision"]
    except (OSError, ValueError, KeyError, TypeError):
        return "-"
    from huggingface_hub import HfApi

    try:
        latest = HfApi(endpoint=endpoint).model_info(repo).sha
    except Exception:  # offline, gone, gated: the answer is "don't know"
        return UNKNOWN
    return UP_TO_DATE if latest == revision else AVAILABLE
