"""LoRA adapters (Modelfile `ADAPTER`, `/api/create` `adapters`): GGUF files that llama.cpp
applies over a base model's weights, checked against that model before they are stored.

llama.cpp checks the shapes only once a model is loaded, and does not check tensor types at
all: an F64 adapter tensor segfaults the first decode. So every adapter is held to what
`llama_adapter_lora_init` accepts, and more, here, where a bad one is a 400 at create time.
"""

from __future__ import annotations

from xllm.models.gguf import GGUF, GGUFError

_INT_TYPES = frozenset({24, 25, 26, 27, 28})
"""GGML_TYPE_I8, I16, I32, I64 and F64: no LoRA kernel takes them."""
_MAX_TYPE = 40


def check(adapter: GGUF, base: GGUF, name: str) -> None:
    """GGUFError (a 400) naming why `adapter` (file `name`) cannot be applied to `base`."""
    meta = adapter.metadata
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise GGUFError(
            f"{name} is not a LoRA adapter (general.type {meta.get('general.type')!r}, "
            f"adapter.type {meta.get('adapter.type')!r}); convert it with llama.cpp's "
            "convert_lora_to_gguf.py"
        )
    if adapter.architecture != base.architecture:
        raise GGUFError(
            f"{name} is an adapter for {adapter.architecture or 'an unknown architecture'}, "
            f"the base model is {base.architecture}"
        )
    weights = {t.name: t for t in base.tensors}
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for t in adapter.tensors:
        target, _, part = t.name.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            continue
        if t.type in _INT_TYPES or not 0 <= t.type <= _MAX_TYPE:
            raise GGUFError(f"{name}: tensor {t.name} has type {t.type}, not a float type")
        if target not in weights:
            raise GGUFError(f"{name}: {t.name} adapts {target}, which the base model lacks")
        pairs.setdefault(target, {})[part] = t.dims
    if not pairs:
        raise GGUFError(f"{name} holds no LoRA tensors (<weight>.lora_a / .lora_b)")
    for target, ab in pairs.items():
        a, b = ab.get("lora_a"), ab.get("lora_b")
        if a is None or b is None:
            raise GGUFError(f"{name}: {target} has only one of lora_a and lora_b")
        w = weights[target].dims
        # token_embd is looked up, not multiplied: its A and B are swapped (llm_build_inp_embd)
        embd = target == "token_embd.weight"
        if len(a) != 2 or len(b) != 2 or len(w) < 2 or (a[0] if embd else a[1]) != b[0]:
            raise GGUFError(f"{name}: {target}'s lora_a {a} and lora_b {b} do not chain")
        if (w[0], w[1]) != ((b[1], a[1]) if embd else (a[0], b[1])):
            raise GGUFError(
                f"{name}: {target} is {w[0]}x{w[1]} in the base model; lora_a {a} and lora_b "
                f"{b} do not fit it (an adapter for another model?)"
            )
