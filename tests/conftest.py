from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)

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


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    make_image(0).save(path)
    return path
