"""Decoding: the batched generation loop, branches and their per-step logit combination."""

from clearsight.decoding.generate import (
    GenerationResult,
    TokenEvent,
    generate,
    load_image,
    make_probe,
    stream_generate,
)

__all__ = ["GenerationResult", "TokenEvent", "generate", "load_image", "make_probe", "stream_generate"]
