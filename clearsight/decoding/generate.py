"""generate(): the simple entry point of decoding.

All rows of the requests in flight (each request's main row plus its mitigations' branch rows)
run through one batched forward per step, left-padded, with one KV cache (``batch.Batch``); the
batch's AttentionPlan is bound around every forward, so the language model's attention executes it.
Per step, each request's branch logits are combined by its mitigations (in the order given:
each combiner receives the logits combined so far as ``"main"``), one token is chosen per request,
and every row of that request is fed that token. ``generate`` runs the Engine's machinery
(``scheduler.Scheduler``: continuous batching) inline, with at most ``decode.batch_size`` requests
in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from clearsight.config import DecodeSpec, GenerationRequest
from clearsight.errors import InputError, pydantic_message
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations import Mitigation, parse_mitigations
from clearsight.models.loader import LVLM


@dataclass
class GenerationResult:
    """What one request produced."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    prompt: str
    id: str | None = None
    mitigations: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
            "finish_reason": self.finish_reason, "mitigations": self.mitigations, "timings": self.timings,
        }


@dataclass
class TokenEvent:
    """One streamed token of one request; the request's last event carries its result."""

    request: int
    token_id: int
    text: str  # the new text since the previous event of this request
    result: GenerationResult | None = None

    @property
    def finished(self) -> bool:
        return self.result is not None


def load_image(image: Any, field_name: str = "image") -> Image.Image:
    """A PIL RGB image from a path or an image; a one-line error for anything else."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = Path(image).expanduser()
    if not path.exists():
        raise InputError(f"{field_name}: file '{image}' does not exist")
    if not path.is_file():
        raise InputError(f"{field_name}: '{image}' is not a file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise InputError(f"{field_name}: '{image}' is not an image PIL can read ({exc.__class__.__name__})") from None


def as_request(r: GenerationRequest | dict[str, Any] | str) -> GenerationRequest:
    if isinstance(r, GenerationRequest):
        return r
    try:
        if isinstance(r, str):
            return GenerationRequest(prompt=r)
        return GenerationRequest.model_validate(r)
    except Exception as exc:  # pydantic ValidationError
        raise InputError(pydantic_message(exc, "request")) from None


def _prepare(
    lvlm: LVLM, requests: Sequence[GenerationRequest | dict[str, Any] | str], mitigations: Sequence[Any],
) -> tuple[list[GenerationRequest], list[list[Mitigation]]]:
    reqs = [as_request(r) for r in requests]
    if not reqs:
        raise InputError("no requests: give at least one prompt")
    default = parse_mitigations(list(mitigations))
    mits = [parse_mitigations(r.mitigations) if r.mitigations is not None else default for r in reqs]
    return reqs, mits


def stream_generate(
    lvlm: LVLM,
    requests: Sequence[GenerationRequest | dict[str, Any] | str],
    mitigations: Sequence[Any] = (),
    decode: DecodeSpec | None = None,
    *,
    stats: StatsRequest | None = None,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are chosen; each request's last event carries its GenerationResult."""
    from clearsight.decoding.batch import Entry
    from clearsight.decoding.scheduler import Scheduler

    decode = decode or DecodeSpec()
    reqs, mits = _prepare(lvlm, requests, mitigations)
    events: deque[TokenEvent] = deque()
    errors: list[BaseException] = []
    # the Engine's machinery, run inline: continuous batching of at most decode.batch_size requests
    scheduler = Scheduler(lvlm, max_requests=decode.batch_size)
    for i, (req, m) in enumerate(zip(reqs, mits)):
        scheduler.add(Entry(req, m, decode, index=i, stats=stats, on_event=events.append, on_error=errors.append))
    try:
        while scheduler.busy:
            scheduler.step()
            if errors:
                raise errors[0]
            while events:
                yield events.popleft()
    finally:
        scheduler.abort()


def generate(
    lvlm: LVLM,
    requests: Sequence[GenerationRequest | dict[str, Any] | str] | GenerationRequest | str,
    mitigations: Sequence[Any] = (),
    decode: DecodeSpec | None = None,
    *,
    stats: StatsRequest | None = None,
) -> list[GenerationResult]:
    """Generate for every request; results in request order.

    >>> from clearsight import load_model, generate
    >>> lvlm = load_model("builtin:tiny-llava")
    >>> [r.finish_reason for r in generate(lvlm, "describe the image", decode=DecodeSpec(max_new_tokens=3))]
    ['length']
    """
    if isinstance(requests, GenerationRequest | str | dict):
        requests = [requests]
    results: dict[int, GenerationResult] = {}
    for event in stream_generate(lvlm, requests, mitigations, decode, stats=stats):
        if event.result is not None:
            results[event.request] = event.result
    return [results[i] for i in sorted(results)]
