"""Tiny builtin models and images shared by the tests."""

from __future__ import annotations

import numpy as np
from PIL import Image

FAMILIES = ("tiny-llava", "tiny-llava-next", "tiny-qwen2-vl")
_CACHE: dict[str, object] = {}


def tiny(name: str, backend: str = "torch"):
    """A builtin tiny model (cached per session; the backend is reset on each call)."""
    from clearsight import load_model

    if name not in _CACHE:
        _CACHE[name] = load_model(f"builtin:{name}")
    lvlm = _CACHE[name]
    lvlm.set_backend(backend)
    return lvlm


def make_image(seed: int, size=(40, 50)) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size[1], size[0], 3) * 255).astype("uint8"))
