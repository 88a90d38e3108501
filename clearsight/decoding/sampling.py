"""Next-token selection: greedy, or seeded temperature / top-p sampling (one generator per request)."""

from __future__ import annotations

import torch

from clearsight.config import DecodeSpec


def select_token(logits: torch.Tensor, decode: DecodeSpec, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V] (float32; -inf marks tokens a plausibility cut removed)."""
    if not decode.do_sample:
        return int(torch.argmax(logits))
    # the generators live on the CPU: sampling there works on any device and draws the same numbers
    probs = torch.softmax(logits.float().cpu() / decode.temperature, dim=-1)
    if decode.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        keep = (sorted_p.cumsum(0) - sorted_p) < decode.top_p
        sorted_p = sorted_p * keep
        choice = torch.multinomial(sorted_p, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def find_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None
