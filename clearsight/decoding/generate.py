"""generate(): the simple entry point of decoding.

All rows of the requests in flight (each request's main row plus its mitigations' branch rows)
run through one batched forward per step, left-padded, with one KV cache (``batch.Batch``); the
batch's AttentionPlan is bound around every forward, so the language model's attention executes it.
Per step, each request's branch logits are combined by its mitigations (in the order given:
each combiner receives the logits combined so far as ``"main"``), one token is chosen per request,
and every row of that request is fed that token. ``generate`` runs the Engine's machinery
(``scheduler.Scheduler``: continuous batching) inline, with at most ``max_batch`` requests in flight
(a keyword of ``generate`` / ``stream_generate``, default ``DEFAULT_MAX_BATCH``; it bounds memory and never
changes a request's tokens). An ``Engine``'s limits are its constructor's.
"""

from __future__ import annotations

import re
import warnings
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError

from clearsight.config import DecodeSpec, GenerationRequest
from clearsight.errors import InputError, pydantic_message
from clearsight.kernels.plan import StatsRequest
from clearsight.mitigations import Mitigation, Probe, parse_mitigations
from clearsight.mitigations.base import set_probe_factory
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
    # for a request run with compile=True: "compiled", "eager (why)" or "mixed: N compiled, M eager (why)"
    decode_step: str | None = None

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


# The largest image accepted, in pixels: 8192 x 8192 (64 megapixels). It takes any photo of a camera up to
# 64 MP and decodes to at most 192 MiB of RGB, while a decompression bomb (a small file that decodes to
# gigabytes: a 20000 x 20000 PNG is 48 KB) is refused from its header, before any pixel is decoded. The models
# resize far below it (LLaVA-1.5 to 336 x 336, Qwen2-VL to 12.8 MP at most by default). It sits below PIL's
# own bomb thresholds (a warning past 89 MP, an error past 179 MP), which end in the same one-line error.
MAX_IMAGE_PIXELS = 8192 * 8192


def _too_large(field_name: str, what: str, pixels: int | None, size: tuple[int, int] | None = None) -> InputError:
    has = (f"is {size[0]} x {size[1]} pixels" if size is not None
           else f"has {pixels:,} pixels" if pixels is not None else "has too many pixels")
    return InputError(f"{field_name}: {what} {has}, more than the limit of {MAX_IMAGE_PIXELS:,} (8192 x 8192, "
                      "clearsight.decoding.generate.MAX_IMAGE_PIXELS): downscale it first")


def check_image_size(size: tuple[int, int], field_name: str = "image", what: str = "the image") -> None:
    """Refuse an empty image (0 pixels wide or high) or one past ``MAX_IMAGE_PIXELS`` (one-line InputError)."""
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{field_name}: {what} is {width} x {height} pixels, empty: give an image of at least "
                         "1 x 1 pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise _too_large(field_name, what, width * height, (width, height))


def load_image(image: Any, field_name: str = "image") -> Image.Image:
    """A PIL RGB image from a path or an image; a one-line error for anything else.

    The size is checked from the file's header before decoding (``check_image_size``): an empty image or
    one past ``MAX_IMAGE_PIXELS`` (a decompression bomb) is refused, as is such a PIL image passed in.
    """
    if isinstance(image, Image.Image):
        check_image_size(image.size, field_name)
        return image.convert("RGB")
    path = Path(image).expanduser()
    if not path.exists():
        raise InputError(f"{field_name}: file '{image}' does not exist")
    if not path.is_file():
        raise InputError(f"{field_name}: '{image}' is not a file")
    what = f"'{image}'"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                check_image_size(im.size, field_name, what)
                return im.convert("RGB")
    except InputError:  # our own size check (an InputError is a ValueError too)
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # PIL's own limits, at open
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise _too_large(field_name, what, int(found.group(1)) if found else None) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{field_name}: '{image}' is not an image PIL can read ({exc.__class__.__name__})") from None


def as_request(r: GenerationRequest | dict[str, Any] | str, what: str = "request") -> GenerationRequest:
    if isinstance(r, GenerationRequest):
        return r
    if not isinstance(r, str | dict):
        raise InputError(f"{what}: a request is a prompt, a dict ({{'prompt': ..., 'image': ...}}) or a "
                         f"GenerationRequest; got {type(r).__name__}")
    try:
        if isinstance(r, str):
            return GenerationRequest(prompt=r)
        return GenerationRequest.model_validate(r)
    except Exception as exc:  # pydantic ValidationError
        raise InputError(pydantic_message(exc, what)) from None


def as_decode(decode: DecodeSpec | dict[str, Any] | None) -> DecodeSpec:
    """A DecodeSpec from one, from a dict of its fields (validated), or the defaults for None."""
    if decode is None:
        return DecodeSpec()
    if isinstance(decode, DecodeSpec):
        return decode
    if isinstance(decode, dict):
        try:
            return DecodeSpec.model_validate(decode)
        except ValidationError as exc:
            raise InputError(pydantic_message(exc, "decode")) from None
    raise InputError(f"decode must be a DecodeSpec or a dict of its fields (e.g. {{'max_new_tokens': 16}}), "
                     f"got {type(decode).__name__}")


def check_context(lvlm: LVLM, index: int, prompt_tokens: int, decode: DecodeSpec, at_least: bool = False) -> None:
    """Refuse a request whose prompt tokens plus ``max_new_tokens`` run past the model's context length."""
    context = lvlm.adapter.max_context
    if context is not None and prompt_tokens + decode.max_new_tokens > context:
        raise InputError(
            f"request {index}: prompt is {'at least ' if at_least else ''}{prompt_tokens} tokens and max_new_tokens "
            f"is {decode.max_new_tokens}, past the model's context of {context} tokens: shorten the prompt or lower "
            "max_new_tokens")


# requests in flight at once in generate() / stream_generate(): an engine limit, not a decoding choice
DEFAULT_MAX_BATCH = 8
MAX_BATCH = 1024


def check_max_batch(max_batch: Any) -> int:
    """``max_batch`` as an int from 1 to ``MAX_BATCH``, or a one-line InputError."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= MAX_BATCH:
        raise InputError(f"max_batch must be an integer from 1 to {MAX_BATCH} (requests in flight at once), "
                         f"got {max_batch!r}")
    return max_batch


Requests = Sequence[GenerationRequest | dict[str, Any] | str] | GenerationRequest | dict[str, Any] | str


def _prepare(
    lvlm: LVLM, requests: Requests, mitigations: Any, decode: DecodeSpec | dict[str, Any] | None,
) -> tuple[list[GenerationRequest], list[list[Mitigation]], DecodeSpec]:
    """Validate everything before anything runs: requests, mitigations, decoding, each prompt against the context."""
    if not isinstance(lvlm, LVLM):
        raise InputError(f"the first argument must be a loaded model (clearsight.load_model(...)), "
                         f"got {type(lvlm).__name__}")
    if requests is None:
        raise InputError("requests is None: give a prompt, a request dict, or a list of them")
    if isinstance(requests, GenerationRequest | str | dict):
        requests = [requests]  # one request, not its letters or keys
    if not isinstance(requests, Sequence):
        raise InputError(f"requests must be a prompt, a request dict, or a list of them; got {type(requests).__name__}")
    reqs = [as_request(r, f"request {i}") for i, r in enumerate(requests)]
    if not reqs:
        raise InputError("no requests: give at least one prompt")
    decode = as_decode(decode)
    default = parse_mitigations(mitigations)
    mits = [parse_mitigations(r.mitigations) if r.mitigations is not None else default for r in reqs]
    adapter = lvlm.adapter
    for i, r in enumerate(reqs):
        # a cheap lower bound before any image is loaded or branch run: the prompt's text tokens (an image adds
        # its tokens on top); the exact count, images expanded, is checked again before the prefill
        text = adapter.chat_prompt(r.prompt, r.image is not None)
        check_context(lvlm, i, adapter.count_tokens(text), decode, at_least=r.image is not None)
    return reqs, mits, decode


def _stream(lvlm: LVLM, reqs: list[GenerationRequest], mits: list[list[Mitigation]], decode: DecodeSpec,
            stats: StatsRequest | None, max_batch: int, backend: str | None = None,
            compile: bool = False) -> Iterator[TokenEvent]:
    from clearsight.decoding.batch import Entry
    from clearsight.decoding.scheduler import Scheduler

    events: deque[TokenEvent] = deque()
    errors: list[BaseException] = []
    # the Engine's machinery, run inline: continuous batching of at most max_batch requests
    scheduler = Scheduler(lvlm, max_requests=max_batch)
    for i, (req, m) in enumerate(zip(reqs, mits)):
        scheduler.add(Entry(req, m, decode, index=i, stats=stats, backend=backend, on_event=events.append,
                            on_error=errors.append, compile=compile))
    try:
        while scheduler.busy:
            scheduler.step()
            if errors:
                raise errors[0]
            while events:
                yield events.popleft()
    finally:
        scheduler.abort()


def stream_generate(
    lvlm: LVLM,
    requests: Requests,
    mitigations: Any = (),
    decode: DecodeSpec | dict[str, Any] | None = None,
    *,
    stats: StatsRequest | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    compile: bool = False,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are chosen; each request's last event carries its GenerationResult.

    The arguments are validated when it is called (bad input raises ``InputError`` here, before any token),
    as ``generate``'s are.
    """
    max_batch = check_max_batch(max_batch)
    check_compile(compile)
    reqs, mits, spec = _prepare(lvlm, requests, mitigations, decode)
    return _stream(lvlm, reqs, mits, spec, stats, max_batch, compile=compile)


def generate(
    lvlm: LVLM,
    requests: Requests,
    mitigations: Any = (),
    decode: DecodeSpec | dict[str, Any] | None = None,
    *,
    stats: StatsRequest | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    compile: bool = False,
) -> list[GenerationResult]:
    """Generate for every request; results in request order.

    ``requests``: a prompt, a request dict (``{"prompt": ..., "image": path or PIL image}``), a
    GenerationRequest, or a list of them. ``mitigations``: a list of names (``"var"``,
    ``"var:p=0.4"``), dicts or specs; a single one may be given alone. ``decode``: a DecodeSpec or a
    dict of its fields (validated), None for the defaults. ``max_batch``: at most this many requests
    in flight at once (continuously batched; the results do not depend on it). ``compile``: decode steps run
    ``torch.compile``d over a preallocated KV cache where the batch allows (``clearsight.decoding.compiled``;
    the same greedy tokens, each result's ``decode_step`` says which step ran); off by default.

    >>> from clearsight import load_model, generate
    >>> lvlm = load_model("builtin:tiny-llava")
    >>> [r.finish_reason for r in generate(lvlm, "describe the image", decode=DecodeSpec(max_new_tokens=3))]
    ['length']
    >>> generate(lvlm, "describe the image", decode={"max_new_tokens": 3}, compile=True)[0].decode_step
    'compiled'
    """
    return _collect(stream_generate(lvlm, requests, mitigations, decode, stats=stats, max_batch=max_batch,
                                    compile=compile))


def check_compile(compile: Any) -> bool:
    """``compile`` as a bool, or a one-line InputError."""
    if not isinstance(compile, bool):
        raise InputError(f"compile must be True or False (the compiled decode step), got {compile!r}")
    return compile


def _collect(events: Iterator[TokenEvent]) -> list[GenerationResult]:
    results: dict[int, GenerationResult] = {}
    for event in events:
        if event.result is not None:
            results[event.request] = event.result
    return [results[i] for i in sorted(results)]


def make_probe(lvlm: LVLM, backend: str | None = None) -> Probe:
    """The probe of ``lvlm`` (``clearsight.mitigations.Probe``): ``generate`` bound to the model and a backend.

    Mitigations run their probe generations through it (``RequestContext.probe``, set by the batch for each
    request with the request's backend; None = the model's), so ``clearsight.mitigations`` never imports
    this package. Each call drives its own inline scheduler to completion: inside the Engine's thread it
    runs between the engine's forwards, and the hooks of requests in flight stay idle (their step is
    ``NOT_RUNNING``). Registered as the default probe of every model (``mitigations.base.probe_for``).

    >>> probe = make_probe(load_model("builtin:tiny-llava"))  # doctest: +SKIP
    >>> probe(["describe the image"], decode={"max_new_tokens": 1})[0].finish_reason  # doctest: +SKIP
    'length'
    """

    def probe(requests: Requests, mitigations: Any = (), decode: DecodeSpec | dict[str, Any] | None = None, *,
              stats: StatsRequest | None = None, max_batch: int = 8, batched: bool = False) -> list[GenerationResult]:
        # batched: a promise about the caller, which only the scheduler's prefetch uses (decoding.probes)
        reqs, mits, spec = _prepare(lvlm, requests, mitigations, decode)
        return _collect(_stream(lvlm, reqs, mits, spec, stats, check_max_batch(max_batch), backend))

    return probe


set_probe_factory(make_probe)
