"""generate(): the decoding loop.

All rows of all requests in a chunk (each request's main row plus its mitigations' branch rows)
run through one batched forward per step, left-padded, with one KV cache. The chunk's
AttentionPlan is bound around every forward, so the language model's attention executes it.
Per step, each request's branch logits are combined by its mitigations (in the order given:
each combiner receives the logits combined so far as ``"main"``), one token is chosen per request,
and every row of that request is fed that token.
"""

from __future__ import annotations

import re
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import ValidationError
from transformers import DynamicCache

from clearsight.config import DecodeSpec, GenerationRequest
from clearsight.decoding.sampling import find_stop, select_token
from clearsight.errors import InputError, pydantic_message
from clearsight.kernels.context import use_plan
from clearsight.kernels.plan import AttentionPlan, StatsRequest
from clearsight.mitigations import MAIN, Mitigation, RequestContext, parse_mitigations
from clearsight.mitigations.base import SAME_IMAGE
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


@dataclass
class _Row:
    request: int
    branch: str
    prompt: str
    image: Image.Image | None
    pixel_transform: Any = None
    until_step: int | None = None


class _Chunk:
    """The state of one batched generation: rows, plan, cache, per-request progress."""

    def __init__(
        self,
        lvlm: LVLM,
        requests: list[GenerationRequest],
        indices: list[int],
        mitigations: list[list[Mitigation]],
        decode: DecodeSpec,
        stats: StatsRequest | None,
    ) -> None:
        self.lvlm, self.requests, self.indices, self.mitigations, self.decode = (
            lvlm, requests, indices, mitigations, decode)
        adapter = lvlm.adapter
        t0 = time.perf_counter()
        images = [load_image(r.image, f"request {i}: image") if r.image is not None else None
                  for i, r in zip(indices, requests)]
        # rows: every request's main row, then its mitigations' branches
        self.ctxs: list[RequestContext] = []
        rows: list[_Row] = []
        for k, (req, image, mits) in enumerate(zip(requests, images, mitigations)):
            ctx = RequestContext(lvlm=lvlm, request=req, index=indices[k], rows={}, layouts=[], plan=None,  # type: ignore[arg-type]
                                 decode=decode, image=image)
            ctx.rows[MAIN] = len(rows)
            rows.append(_Row(k, MAIN, req.prompt, image))
            for m in mits:
                for br in m.branches(ctx):
                    name = f"{m.name}.{br.name}"
                    if name in ctx.rows:
                        raise ValueError(f"mitigation {m.name} declared branch '{br.name}' twice")
                    br_image = image if br.image == SAME_IMAGE else br.image
                    if isinstance(br_image, str):
                        br_image = load_image(br_image, f"{m.name} branch image")
                    ctx.rows[name] = len(rows)
                    ctx.branch_specs[name] = br
                    rows.append(_Row(k, name, br.prompt or req.prompt, br_image, br.pixel_transform, br.until_step))
            self.ctxs.append(ctx)
        self.rows = rows
        texts = [adapter.chat_prompt(r.prompt, r.image is not None) for r in rows]
        batch = adapter.encode(texts, [r.image for r in rows])
        lengths = batch["attention_mask"].sum(1).tolist()  # every row's tokens, images expanded
        for k in range(len(requests)):  # before any forward: a prompt past the context is never run
            check_context(lvlm, indices[k], int(max(n for r, n in zip(rows, lengths) if r.request == k)), decode)
        self._transform_pixels(batch, rows)
        self.batch = {k: v.to(lvlm.device) for k, v in batch.items()}
        self.layouts = adapter.row_layouts(self.batch)
        for r, lay in zip(rows, self.layouts):
            if r.image is not None and not lay.image_spans:
                raise InputError("the processor inserted no image tokens: the chat template lacks an image slot")
        self.plan = AttentionPlan(num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                                  segment=adapter.segments(self.batch).to(lvlm.device), layouts=self.layouts)
        if stats is not None:
            self.plan.stats = stats
        for ctx, mits in zip(self.ctxs, mitigations):
            ctx.plan, ctx.layouts, ctx.inputs = self.plan, self.layouts, self.batch
            for m in mits:
                m.apply(ctx)
        self.position_ids = adapter.prefill_position_ids(self.batch, self.layouts)
        if self.plan.position_ids is not None:
            if self.position_ids.ndim != 2:
                raise InputError(f"position-id overrides are not supported for {adapter.family} (3-D M-RoPE)")
            self.position_ids = self.plan.position_ids
        self.generators = [torch.Generator().manual_seed(r.seed if r.seed is not None else decode.seed)
                           for r in requests]
        self.tokens: list[list[int]] = [[] for _ in requests]
        self.texts: list[str] = ["" for _ in requests]
        self.finish: list[str | None] = [None for _ in requests]
        self.timings = {"prepare_s": time.perf_counter() - t0, "prefill_s": 0.0}
        self.eos = adapter.eos_token_ids

    def _transform_pixels(self, batch: dict[str, torch.Tensor], rows: list[_Row]) -> None:
        """Apply branches' pixel transforms to their own image's processed pixels."""
        if not any(r.pixel_transform for r in rows):
            return
        slices = iter(self.lvlm.adapter.image_pixel_slices(batch))
        pixels = batch["pixel_values"].clone()
        for r in rows:
            if r.image is None:
                continue
            sl = next(slices)
            if r.pixel_transform is not None:
                pixels[sl] = r.pixel_transform(pixels[sl])
        batch["pixel_values"] = pixels

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache: DynamicCache | None,
                extra: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, DynamicCache]:
        for ctx in self.ctxs:
            ctx.step = step
        with use_plan(self.plan):
            out = self.lvlm.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=self.position_ids,
                past_key_values=cache if cache is not None else DynamicCache(config=self.lvlm.model.config),
                use_cache=True, logits_to_keep=1, **extra,
            )
        return out.logits[:, -1].float(), out.past_key_values

    def combined_logits(self, logits: torch.Tensor, k: int, step: int) -> torch.Tensor:
        ctx = self.ctxs[k]
        current = logits[ctx.main_row]
        for m in self.mitigations[k]:
            prefix = m.name + "."
            own = {name[len(prefix):]: logits[row] for name, row in ctx.rows.items() if name.startswith(prefix)}
            new = m.combine({MAIN: current, **own}, step, ctx)
            if new is not None:
                current = new
        return current

    def run(self) -> Iterator[TokenEvent]:
        installed = []
        try:
            for ctx, mits in zip(self.ctxs, self.mitigations):
                for m in mits:
                    handle = m.install(ctx)
                    if handle is not None:
                        installed.append(handle)
            yield from self._loop()
        finally:
            for handle in installed:
                handle.remove()

    def _loop(self) -> Iterator[TokenEvent]:
        lvlm, decode = self.lvlm, self.decode
        tok = lvlm.adapter.tokenizer
        ids, mask = self.batch["input_ids"], self.batch["attention_mask"]
        t0 = time.perf_counter()
        logits, cache = self.forward(ids, mask, None, lvlm.adapter.forward_inputs(self.batch), step=0)
        self.timings["prefill_s"] = time.perf_counter() - t0
        self._t_decode = time.perf_counter()
        row_request = torch.tensor([r.request for r in self.rows])
        pad_id, device = lvlm.adapter.pad_token_id, lvlm.device
        for step in range(decode.max_new_tokens):
            chosen = torch.full((len(self.requests),), pad_id, dtype=torch.long)
            for k in range(len(self.requests)):
                if self.finish[k] is not None:
                    continue
                token = select_token(self.combined_logits(logits, k, step), decode, self.generators[k])
                chosen[k] = token
                yield from self._accept(k, token, tok)
            if all(f is not None for f in self.finish):  # _accept ends every request by max_new_tokens
                break
            keep = self._rows_to_keep(step)
            if len(keep) < len(self.rows):
                mask, cache = self._select_rows(keep, mask, cache)
                row_request = torch.tensor([r.request for r in self.rows])
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            self.position_ids = lvlm.adapter.next_position_ids(lvlm.adapter.last_positions(self.position_ids))
            step_ids = chosen[row_request].view(-1, 1).to(device)
            logits, cache = self.forward(step_ids, mask, cache, {}, step=step + 1)

    def _rows_to_keep(self, step: int) -> list[int]:
        """Rows still needed after this step: not of a finished request, not a branch past its until_step.

        Statistics are recorded per forward with the batch's row numbers, so with statistics every row stays.
        """
        if self.plan.stats.segment_mass or self.plan.stats.last_row:
            return list(range(len(self.rows)))
        return [i for i, r in enumerate(self.rows)
                if self.finish[r.request] is None and (r.until_step is None or r.until_step > step)]

    def _select_rows(self, keep: list[int], mask: torch.Tensor, cache: DynamicCache
                     ) -> tuple[torch.Tensor, DynamicCache]:
        """Drop the other rows from the batch: KV cache, mask, positions, plan, and each request's row map."""
        idx = torch.tensor(keep, device=mask.device)
        cache.batch_select_indices(idx)
        self.position_ids = self.position_ids.index_select(self.position_ids.ndim - 2, idx)
        self.plan.select_rows(keep)
        new_index = {old: new for new, old in enumerate(keep)}
        self.rows = [self.rows[i] for i in keep]
        self.layouts = self.plan.layouts
        for ctx in self.ctxs:
            ctx.rows = {name: new_index[row] for name, row in ctx.rows.items() if row in new_index}
            ctx.layouts = self.layouts
        return mask.index_select(0, idx), cache

    def _accept(self, k: int, token: int, tok) -> Iterator[TokenEvent]:
        if token in self.eos and not self.decode.ignore_eos:
            self.finish[k] = "eos"
            yield TokenEvent(self.indices[k], token, "", self._result(k))
            return
        self.tokens[k].append(token)
        text = tok.decode(self.tokens[k], skip_special_tokens=True)
        cut = find_stop(text, self.decode.stop)
        if cut is not None:
            text = text[:cut]
        delta = text[len(self.texts[k]):] if text.startswith(self.texts[k]) else text
        self.texts[k] = text
        if cut is not None:
            self.finish[k] = "stop"
            yield TokenEvent(self.indices[k], token, delta, self._result(k))
        elif len(self.tokens[k]) >= self.decode.max_new_tokens:
            self.finish[k] = "length"
            yield TokenEvent(self.indices[k], token, delta, self._result(k))
        else:
            yield TokenEvent(self.indices[k], token, delta)

    def _result(self, k: int) -> GenerationResult:
        timings = dict(self.timings)
        timings["decode_s"] = time.perf_counter() - self._t_decode
        timings["new_tokens"] = float(len(self.tokens[k]))
        # decode steps after the first token (which comes from the prefill logits)
        steps = max(len(self.tokens[k]) - 1, 0)
        timings["decode_tokens_per_s"] = steps / timings["decode_s"] if steps and timings["decode_s"] > 0 else 0.0
        return GenerationResult(
            text=self.texts[k].strip(), token_ids=list(self.tokens[k]), finish_reason=self.finish[k] or "length",
            prompt=self.requests[k].prompt, id=self.requests[k].id,
            mitigations=[m.describe() for m in self.mitigations[k]], timings=timings,
            stats=self._stats(k),
        )

    def _stats(self, k: int) -> dict[str, Any] | None:
        out = self.plan.stats_out
        if not (out.segment_mass or out.last_row):
            return None
        row = self.ctxs[k].main_row
        pad = self.layouts[row].pad
        stats: dict[str, Any] = {"pad": pad, "layout": self.layouts[row]}
        if out.segment_mass:
            stats["segment_mass"] = {l: torch.cat([m[row] for m in ms], 1)[:, pad:].cpu()
                                     for l, ms in out.segment_mass.items()}
        if out.last_row:
            stats["last_row"] = {l: [m[row, :, pad:].cpu() for m in ms] for l, ms in out.last_row.items()}
        return stats


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
            stats: StatsRequest | None) -> Iterator[TokenEvent]:
    with torch.inference_mode():
        for start in range(0, len(reqs), decode.batch_size):
            idx = list(range(start, min(start + decode.batch_size, len(reqs))))
            chunk = _Chunk(lvlm, [reqs[i] for i in idx], idx, [mits[i] for i in idx], decode, stats)
            yield from chunk.run()


def stream_generate(
    lvlm: LVLM,
    requests: Requests,
    mitigations: Any = (),
    decode: DecodeSpec | dict[str, Any] | None = None,
    *,
    stats: StatsRequest | None = None,
) -> Iterator[TokenEvent]:
    """Yield tokens as they are chosen; each request's last event carries its GenerationResult.

    The arguments are validated when it is called (bad input raises ``InputError`` here, before any token),
    as ``generate``'s are.
    """
    reqs, mits, spec = _prepare(lvlm, requests, mitigations, decode)
    return _stream(lvlm, reqs, mits, spec, stats)


def generate(
    lvlm: LVLM,
    requests: Requests,
    mitigations: Any = (),
    decode: DecodeSpec | dict[str, Any] | None = None,
    *,
    stats: StatsRequest | None = None,
) -> list[GenerationResult]:
    """Generate for every request; results in request order.

    ``requests``: a prompt, a request dict (``{"prompt": ..., "image": path or PIL image}``), a
    GenerationRequest, or a list of them. ``mitigations``: a list of names (``"var"``,
    ``"var:p=0.4"``), dicts or specs; a single one may be given alone. ``decode``: a DecodeSpec or a
    dict of its fields (validated), None for the defaults.

    >>> from clearsight import load_model, generate
    >>> lvlm = load_model("builtin:tiny-llava")
    >>> [r.finish_reason for r in generate(lvlm, "describe the image", decode=DecodeSpec(max_new_tokens=3))]
    ['length']
    """
    results: dict[int, GenerationResult] = {}
    for event in stream_generate(lvlm, requests, mitigations, decode, stats=stats):
        if event.result is not None:
            results[event.request] = event.result
    return [results[i] for i in sorted(results)]
