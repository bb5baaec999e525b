"""Llama 3's rope scaling (`rope_scaling.rope_type: llama3`), which llama.cpp does not compute
from keys but reads as a tensor, `rope_freqs` (one factor per rotary frequency, dividing it),
made by its converter as here. On the way back the scaling is solved from the tensor: the
factor is its largest value, and the smooth ramp between 1 and the factor fixes the two
wavelengths where it starts and ends; their scale is arbitrary (a low_freq_factor of 1 is
Llama 3's and gives the same frequencies as any other), so it is kept at 1.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from xllm.models.safetensors import SafetensorsError

_DEFAULTS = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
"""llama.cpp's converter's defaults for keys a llama3 rope_scaling leaves out (Llama 3.1's)."""


def _head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def _wavelengths(base: float, dim: int) -> npt.NDArray[np.float32]:
    freqs = np.float32(1.0) / np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / dim)
    return np.asarray(np.float32(2 * math.pi) / freqs, np.float32)


def factors(config: dict[str, Any]) -> npt.NDArray[np.float32] | None:
    """The `rope_freqs` tensor of a llama3-scaled model (None for any other), computed in F32
    as llama.cpp's converter does it in torch."""
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    s = {**_DEFAULTS, **{k: v for k, v in scaling.items() if v is not None}}
    if "original_max_position_embeddings" not in scaling:
        s["original_max_position_embeddings"] = config.get(
            "original_max_position_embeddings", _DEFAULTS["original_max_position_embeddings"]
        )
    factor, low, high = (
        np.float32(s[k]) for k in ("factor", "low_freq_factor", "high_freq_factor")
    )
    old = np.float32(s["original_max_position_embeddings"])
    wavelen = _wavelengths(config.get("rope_theta", 10000.0), _head_dim(config))
    smooth = (old / wavelen - low) / (high - low)
    ramp = np.float32(1) / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < old / high, np.float32(1), np.where(wavelen > old / low, factor, ramp))
    return np.asarray(out, np.float32)


def scaling(values: npt.NDArray[Any], config: dict[str, Any]) -> dict[str, Any]:
    """The llama3 `rope_scaling` that makes `values` (a GGUF's rope_freqs) for this config."""
    values = np.asarray(values, np.float32)
    factor = float(values.max())
    found = {"rope_type": "llama3", **_DEFAULTS, "factor": factor}
    wavelen = _wavelengths(config.get("rope_theta", 10000.0), _head_dim(config)).astype(np.float64)
    ramp = (values > 1) & (values < factor)
    if ramp.sum() >= 2:  # smooth = a / wavelen - b, solved from the ramp with low = 1
        smooth = (1 / values[ramp] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[ramp], smooth, 1) * (1, -1)
        found.update(
            high_freq_factor=round(float(1 + 1 / b), 4),
            original_max_position_embeddings=round(float(a / b)),
        )
    remade = factors({**config, "rope_scaling": found})
    if remade is None or remade.shape != values.shape or not np.allclose(remade, values, 1e-4):
        raise SafetensorsError(
            "rope_freqs.weight is not Llama 3's rope scaling: xllm cannot say which "
            "rope_scaling made it"
        )
    return found
