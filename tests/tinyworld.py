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


def blank_png(path, width: int, height: int) -> None:
    """A valid all-black 1-bit PNG of any size, written without building the image: a 20000 x 20000 one (a
    decompression bomb: 400 megapixels) is about 200 KB and takes a fraction of a second."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = height * (1 + (width + 7) // 8)  # every row: filter byte 0, then the packed bits, all zero
    comp, block, parts = zlib.compressobj(1), bytes(1 << 20), []
    while raw > 0:
        parts.append(comp.compress(block[: min(raw, len(block))]))
        raw -= len(block)
    parts.append(comp.flush())
    with open(path, "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
                 + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))
