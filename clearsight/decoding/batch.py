"""The state of continuous batching: requests in flight, their rows, one KV cache, one plan.

An ``Entry`` is one request in flight (its mitigations, decode spec, sampler, tokens, hooks). A ``Batch``
is a set of rows (each entry's main row plus its branch rows) with one left-padded DynamicCache, one
attention mask and one AttentionPlan. Its life:

- ``Batch.prefill(lvlm, entries)``: a newcomer group is encoded, planned (mitigations ``apply``), hooked
  (``install``) and prefilled as its own small batch;
- ``choose()``: per entry, the branch logits are combined, one token is chosen and the events are
  produced; rows of finished / cancelled requests and expired branch rows leave (``select``), then the
  leading all-padding key columns are dropped (compaction);
- ``join(other)``: two batches in that "token chosen, not yet fed" state become one. The shorter side's
  KV cache, mask and plan are left-padded so that the key lengths match, then rows are concatenated.
  Padding keys are masked and positions are per row, so a row's computation is unchanged;
- ``decode()``: one forward of every row with the chosen tokens; when every request asked for it
  (``compile=True``) and the plan allows, the compiled step over a preallocated cache (``decoding.compiled``),
  copied back to the DynamicCache before any row operation.

Memory: a joined batch stores B x max(Lk) keys per layer; a row shorter than the longest one costs
its padding until the longest rows leave and the batch is compacted.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from clearsight.config import STOCK_BACKENDS, DecodeSpec, GenerationRequest
from clearsight.decoding.compiled import NotCapturable, StaticDecode, why_not
from clearsight.decoding.generate import GenerationResult, TokenEvent, check_context, load_image, make_probe
from clearsight.decoding.probes import BatchingProbe
from clearsight.decoding.recent_rows import RecentRows
from clearsight.decoding.sampling import find_stop, select_token
from clearsight.errors import InputError
from clearsight.kernels.context import use_backend, use_plan
from clearsight.kernels.plan import AttentionPlan, RowLayout, StatsRequest
from clearsight.mitigations import MAIN, Mitigation, RequestContext
from clearsight.mitigations.base import SAME_IMAGE
from clearsight.models.loader import LVLM

NOT_RUNNING = -1  # ctx.step of a request while a forward of another batch runs (its hooks must do nothing)


@dataclass
class _Row:
    entry: Entry
    branch: str
    prompt: str
    image: Image.Image | list[Image.Image] | None  # a list: several images in this row (CARVE's re-query)
    pixel_transform: Any = None
    until_step: int | None = None
    template: bool = True  # False: ``prompt`` is the row's whole text (Branch.template)


def _num_images(row: _Row) -> int:
    return 0 if row.image is None else len(row.image) if isinstance(row.image, list) else 1


class Entry:
    """One request in flight: its mitigations, decode spec, sampler, progress and installed hooks.

    ``on_event`` / ``on_error`` are called by whoever runs the batches (never concurrently).
    """

    def __init__(self, request: GenerationRequest, mitigations: list[Mitigation], decode: DecodeSpec, *,
                 index: int = 0, stats: StatsRequest | None = None, backend: str | None = None,
                 on_event: Callable[[TokenEvent], None] | None = None,
                 on_error: Callable[[BaseException], None] | None = None, compile: bool = False) -> None:
        self.request, self.mitigations, self.decode, self.index = request, mitigations, decode, index
        self.compile = compile  # asks for the compiled decode step (decoding.compiled); an execution choice
        self.steps = {"compiled": 0, "eager": 0}  # decode steps run each way (counted when compile is asked)
        self.eager_because: str | None = None  # why the last eager step of a compile request was not compiled
        self.stats, self.backend = stats, backend
        self.on_event, self.on_error = on_event, on_error
        self.generator: torch.Generator | None = None  # seeded by prepare(), which every request runs first
        self.ctx: RequestContext | None = None
        self.rows: list[_Row] = []
        self.step = 0
        self.tokens: list[int] = []
        self.text = ""
        self.finish: str | None = None
        self.cancelled = False  # set from any thread; the runner drops the rows at its next step
        self.done = False  # finished, failed or cancelled: no more events
        self.installed: list[Any] = []
        self.timings: dict[str, float] = {"submitted": time.perf_counter()}
        self.layout: RowLayout | None = None  # the main row's layout without padding (statistics)
        self.stats_acc: dict[str, dict[int, list[torch.Tensor]]] = {"segment_mass": {}, "last_row": {}}
        self.warner: Callable[[str, type[Warning]], None] | None = None  # the scheduler's (RequestContext.warn)
        self.probe: BatchingProbe | None = None  # the last preparation's probe (its noted calls, when recording)
        self.probe_memo: dict[Any, list[Any]] = {}  # prefetched probe results (decoding.probes), kept for retries
        self.prefetched = False  # the scheduler tried to prefetch this request's probes

    @property
    def key(self) -> tuple[str | None, tuple | None]:
        """Requests with the same key share a batch (one backend and one statistics request per forward)."""
        s = self.stats
        if s is None or not (s.segment_mass or s.last_row):
            return self.backend, None
        return self.backend, (s.segment_mass, s.last_row, None if s.layers is None else tuple(sorted(s.layers)))

    @property
    def active(self) -> bool:
        return not self.done and not self.cancelled and self.finish is None

    # ------------------------------------------------------------------ preparation
    def prepare(self, lvlm: LVLM, record: bool = False) -> None:
        """Load the image, let the mitigations prepare and ask them for their branch rows (a fresh context
        each time). ``record``: a batchable probe call that is not prefetched yet is noted in ``self.probe``
        and raises ``decoding.probes.ProbeDeferred`` (the scheduler runs such calls batched)."""
        self.remove_hooks()
        req = self.request
        image = load_image(req.image, f"request {self.index}: image") if req.image is not None else None
        self.probe = BatchingProbe(make_probe(lvlm, self.backend), self.probe_memo, recording=record)
        ctx = RequestContext(lvlm=lvlm, request=req, index=self.index, rows={}, layouts=[], plan=None,  # type: ignore[arg-type]
                             decode=self.decode, image=image, probe=self.probe, warner=self.warner)
        main_image: Image.Image | list[Image.Image] | None = image
        for m in self.mitigations:  # a mitigation may replace the request's input image(s) (CARVE)
            new = m.input_images(ctx)
            if new is not None:
                main_image = new[0] if len(new) == 1 else list(new)
                ctx.image = new[-1]
        for m in self.mitigations:
            m.prepare(ctx)
        rows = [_Row(self, MAIN, req.prompt, main_image)]
        ctx.rows[MAIN] = 0
        for m in self.mitigations:
            for br in m.branches(ctx):
                name = f"{m.name}.{br.name}"
                if name in ctx.rows:
                    raise ValueError(f"mitigation {m.name} declared branch '{br.name}' twice")
                br_image = image if br.image == SAME_IMAGE else br.image
                if isinstance(br_image, str):
                    br_image = load_image(br_image, f"{m.name} branch image")
                ctx.rows[name] = len(rows)
                ctx.branch_specs[name] = br
                prompt = br.prompt if br.prompt is not None else req.prompt
                rows.append(_Row(self, name, prompt, br_image, br.pixel_transform, br.until_step, br.template))
        self.probe.recording = False  # prepared: later calls (apply, install, steps) run at once
        self.ctx, self.rows, self.step = ctx, rows, 0
        # every (re)start, e.g. a retry after a failed group prefill, samples from the request's seed again
        self.generator = torch.Generator().manual_seed(req.seed if req.seed is not None else self.decode.seed)
        self.tokens, self.text, self.finish = [], "", None
        self.timings.pop("first_token", None)
        self.steps, self.eager_because = {"compiled": 0, "eager": 0}, None
        self.stats_acc = {"segment_mass": {}, "last_row": {}}

    def remove_hooks(self) -> None:
        for handle in self.installed:
            handle.remove()
        self.installed = []

    # ------------------------------------------------------------------ tokens and results
    def combined_logits(self, logits: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        assert ctx is not None
        current = logits[ctx.main_row]
        for m in self.mitigations:
            prefix = m.name + "."
            own = {name[len(prefix):]: logits[row] for name, row in ctx.rows.items() if name.startswith(prefix)}
            new = m.combine({MAIN: current, **own}, self.step, ctx)
            if new is not None:
                current = new
        return current

    def accept(self, token: int, lvlm: LVLM) -> TokenEvent:
        if "first_token" not in self.timings:
            self.timings["first_token"] = time.perf_counter()
        if token in lvlm.adapter.eos_token_ids and not self.decode.ignore_eos:
            self.finish = "eos"
            return TokenEvent(self.index, token, "", self.result())
        self.tokens.append(token)
        text = lvlm.adapter.tokenizer.decode(self.tokens, skip_special_tokens=True)
        cut = find_stop(text, self.decode.stop)
        if cut is not None:
            text = text[:cut]
        delta = text[len(self.text):] if text.startswith(self.text) else text
        self.text = text
        if cut is not None:
            self.finish = "stop"
        elif len(self.tokens) >= self.decode.max_new_tokens:
            self.finish = "length"
        return TokenEvent(self.index, token, delta, self.result() if self.finish else None)

    def result(self) -> GenerationResult:
        t = self.timings
        now = time.perf_counter()
        timings = {"prepare_s": t.get("prepare_s", 0.0), "prefill_s": t.get("prefill_s", 0.0)}
        timings["decode_s"] = now - t.get("prefilled", now)
        timings["new_tokens"] = float(len(self.tokens))
        steps = max(len(self.tokens) - 1, 0)  # decode steps after the first token (from the prefill logits)
        timings["decode_tokens_per_s"] = steps / timings["decode_s"] if steps and timings["decode_s"] > 0 else 0.0
        if "admitted" in t:
            timings["queue_s"] = t["admitted"] - t["submitted"]
        if "first_token" in t:
            timings["ttft_s"] = t["first_token"] - t["submitted"]
        timings["latency_s"] = now - t["submitted"]
        return GenerationResult(
            text=self.text.strip(), token_ids=list(self.tokens), finish_reason=self.finish or "length",
            prompt=self.request.prompt, id=self.request.id,
            mitigations=[m.describe() for m in self.mitigations], timings=timings, stats=self._stats(),
            decode_step=self._decode_step(),
        )

    def _decode_step(self) -> str | None:
        """Which decode step ran, for a request that asked for the compiled one (None otherwise)."""
        if not self.compile:
            return None
        n = self.steps
        if not n["eager"]:
            return "compiled"
        if not n["compiled"]:
            return f"eager ({self.eager_because})"
        return f"mixed: {n['compiled']} compiled, {n['eager']} eager ({self.eager_because})"

    def _stats(self) -> dict[str, Any] | None:
        acc = self.stats_acc
        if not (acc["segment_mass"] or acc["last_row"]):
            return None
        out: dict[str, Any] = {"pad": 0, "layout": self.layout}
        if acc["segment_mass"]:
            out["segment_mass"] = {l: torch.cat(ms, 1).cpu() for l, ms in acc["segment_mass"].items()}
        if acc["last_row"]:
            out["last_row"] = {l: [m.cpu() for m in ms] for l, ms in acc["last_row"].items()}
        return out


def full_cache() -> DynamicCache:
    """A KV cache whose every layer keeps every key. Not ``DynamicCache(config=...)``: for a family with
    sliding-window layers (Gemma 3) that keeps only the window there, so key index j would mean different tokens
    in different layers (the plan's segments and masks index keys) and the batch could not be joined; with every
    key kept, transformers' mask (and ``AttentionPlan.windowed``) applies the window instead."""
    return DynamicCache()


def _pad_layer(layer: DynamicLayer, n: int) -> None:
    if n:
        for name in ("keys", "values"):
            t = getattr(layer, name)
            setattr(layer, name, torch.cat([t.new_zeros(*t.shape[:2], n, t.shape[3]), t], 2))


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    layers = list(cache.layers)
    for layer in layers:
        if type(layer) is not DynamicLayer or not layer.is_initialized:
            raise NotImplementedError(f"joining batches needs plain DynamicLayer caches, got {type(layer).__name__}")
    return layers


class Batch:
    """Rows of requests in flight with one KV cache, mask and plan (see the module docstring)."""

    def __init__(self, lvlm: LVLM, key: tuple[str | None, tuple | None], stats: StatsRequest | None = None) -> None:
        self.lvlm, self.key = lvlm, key
        self.backend = key[0] or lvlm.backend
        self.stats = stats if key[1] is not None else None
        self.entries: list[Entry] = []
        self.rows: list[_Row] = []
        self.plan: AttentionPlan
        self.cache: DynamicCache
        self.mask: torch.Tensor  # [B, Lk] 1 = real key, 0 = padding
        self.pos: torch.Tensor  # the positions of each row's last fed token ([B, 1] or [3, B, 1])
        self.next_ids: torch.Tensor  # [B] the token each row is fed next
        self.logits: torch.Tensor | None = None
        self.compile = False  # every entry asked for the compiled decode step (set by prefill)
        self.static: StaticDecode | None = None  # the preallocated cache while compiled steps run

    @property
    def num_rows(self) -> int:
        return len(self.rows)

    @property
    def num_keys(self) -> int:
        return int(self.mask.shape[1])

    @property
    def tokens_in_flight(self) -> int:
        """KV entries held, padding included (rows x key columns)."""
        return self.num_rows * self.num_keys

    # ------------------------------------------------------------------ prefill of a newcomer group
    @classmethod
    def prefill(cls, lvlm: LVLM, entries: list[Entry], recent: RecentRows | None = None) -> Batch:
        """Encode, plan, hook and prefill ``entries`` (prepared, same key) as one batch; logits ready. Rows that
        repeat another row of the group, or a row ``recent`` holds (an earlier group's), are not run again.

        On an error every hook installed here is removed again and the error propagates.
        """
        self = cls(lvlm, entries[0].key, entries[0].stats)
        self.compile = all(e.compile for e in entries)
        adapter = lvlm.adapter
        t0 = time.perf_counter()
        try:
            rows: list[_Row] = []
            for e in entries:
                assert e.ctx is not None
                base = len(rows)
                e.ctx.rows = {name: base + r for name, r in e.ctx.rows.items()}
                rows.extend(e.rows)
            self.entries, self.rows = list(entries), rows
            texts = [adapter.chat_prompt(r.prompt, _num_images(r)) if r.template else r.prompt for r in rows]
            batch = adapter.encode(texts, [r.image for r in rows])
            lengths = batch["attention_mask"].sum(1).tolist()  # every row's tokens, images expanded
            first = 0
            for e in entries:  # before any forward: a prompt past the context is never run
                check_context(lvlm, e.index, int(max(lengths[first:first + len(e.rows)])), e.decode)
                first += len(e.rows)
            self._transform_pixels(batch)
            batch = {k: v.to(lvlm.device) for k, v in batch.items()}
            layouts = adapter.row_layouts(batch)
            for r, lay in zip(rows, layouts):
                if r.image is not None and not lay.image_spans:
                    raise InputError("the processor inserted no image tokens: the chat template lacks an image slot")
                if isinstance(r.image, list) and len(lay.image_spans) != len(r.image):
                    raise InputError(f"{len(r.image)} images in one prompt gave {len(lay.image_spans)} image-token "
                                     f"spans on {adapter.family}: this family cannot separate several images of one "
                                     "prompt; use one image per request")
            plan = AttentionPlan(num_layers=adapter.num_layers, num_heads=adapter.num_heads,
                                 segment=adapter.segments(batch).to(lvlm.device), layouts=layouts)
            if self.stats is not None:
                plan.stats = self.stats
            self.plan = plan
            for e in entries:
                ctx = e.ctx
                assert ctx is not None
                ctx.plan, ctx.layouts, ctx.inputs = plan, plan.layouts, batch
                for m in e.mitigations:
                    m.apply(ctx)
            if self.backend in STOCK_BACKENDS and (plan.layers or plan.has_custom_mask):
                # transformers' own attention never reads the plan: its edits would silently do nothing
                names = sorted({m.name for e in entries for m in e.mitigations})
                raise InputError(f"backend '{self.backend}' is transformers' own attention, which does not run the "
                                 f"attention edits of {', '.join(names)}: use backend torch, triton or reference")
            adapter.prepare_plan(plan)  # after that check: stock attention runs the family's own mask itself
            position_ids = adapter.prefill_position_ids(batch, layouts)
            if plan.position_ids is not None:
                if position_ids.ndim != 2:
                    raise InputError(f"position-id overrides are not supported for {adapter.family} (3-D M-RoPE)")
                position_ids = plan.position_ids
            for e in entries:
                for m in e.mitigations:
                    handle = m.install(e.ctx)  # type: ignore[arg-type]
                    if handle is not None:
                        e.installed.append(handle)
            t1 = time.perf_counter()
            self.mask = batch["attention_mask"]
            self.cache = full_cache()
            digests = self._row_digests(batch, position_ids)
            if digests is None:
                self._forward(batch["input_ids"], position_ids, adapter.forward_inputs(batch))
            else:
                self._forward_shared(batch, position_ids, digests, recent)
            self.pos = adapter.last_positions(position_ids)
        except BaseException:
            for e in entries:
                e.remove_hooks()
            raise
        t2 = time.perf_counter()
        for e in entries:
            assert e.ctx is not None
            lay = plan.layouts[e.ctx.main_row]
            e.layout = RowLayout(0, tuple((s - lay.pad, x - lay.pad) for s, x in lay.image_spans), lay.grids)
            e.timings.update(prepare_s=t1 - t0, prefill_s=t2 - t1, prefilled=t2)
        return self

    def _row_digests(self, batch: dict[str, torch.Tensor], position_ids: torch.Tensor) -> list[bytes] | None:
        """Each row's content (its tokens, their positions, its pixels, the backend), or None when rows may not
        share a forward.

        Branch rows repeat often: INTER's rows without the prompt are the same for every question about an
        image, and its row with neither image nor prompt the same for every request; in a packed eval the
        unmitigated prompt is every logits-level system's main row. Rows share a forward only when nothing can
        tell them apart inside it: no plan edit, custom mask or position override, no statistics, no hook (hooks
        index rows of the batch), a backend whose empty-plan path is transformers' own attention, left padding,
        and only ids, mask and pixels as inputs (a family with image sizes or grids is left alone). Causal
        attention makes a row's keys and logits a function of its own tokens only (padding keys are masked)."""
        plan = self.plan
        if ((self.backend not in STOCK_BACKENDS and self.backend != "torch") or plan.layers
                or plan.has_custom_mask or plan.position_ids is not None or plan.stats.segment_mass
                or plan.stats.last_row or plan.capture_layer is not None or any(e.installed for e in self.entries)
                or self.lvlm.adapter.has_forward_hooks()
                or set(batch) - {"input_ids", "attention_mask", "pixel_values"} or position_ids.ndim != 2):
            return None
        mask = batch["attention_mask"]
        lengths = mask.sum(1)
        width = mask.shape[1]
        if not bool((mask.cumsum(1) == (torch.arange(1, width + 1, device=mask.device) - (width - lengths)[:, None])
                     .clamp(min=0)).all()):
            return None  # not left-padded: a row's keys would not be its last columns
        slices = iter(self.lvlm.adapter.image_pixel_slices(batch))
        pixels = batch.get("pixel_values")
        out = []
        for i, r in enumerate(self.rows):
            n = int(lengths[i])
            h = hashlib.sha256(self.backend.encode())
            for t in (batch["input_ids"][i, width - n:], position_ids[i, width - n:]):
                h.update(t.cpu().numpy().tobytes())
            for _ in range(_num_images(r)):
                assert pixels is not None
                px = pixels[next(slices)]
                h.update(str((px.dtype, tuple(px.shape))).encode())
                h.update(px.cpu().numpy().tobytes())
            out.append(h.digest())
        return out

    def _forward_shared(self, batch: dict[str, torch.Tensor], position_ids: torch.Tensor, digests: list[bytes],
                        recent: RecentRows | None) -> None:
        """Prefill each distinct row once, and none that ``recent`` holds; every row gets its copy of the keys,
        values and logits, and the rows run here are offered to ``recent`` for later groups."""
        kept = list(dict.fromkeys(digests))  # the distinct rows, in order of first appearance
        slot = {d: j for j, d in enumerate(kept)}
        inverse = [slot[d] for d in digests]
        rows_of: dict[bytes, int] = {}  # each distinct row's first row in the group
        for i, d in enumerate(digests):
            rows_of.setdefault(d, i)
        stored = [recent.get(d) if recent is not None else None for d in kept]
        run = [rows_of[d] for d, s in zip(kept, stored) if s is None]
        width, lengths = self.num_keys, self.mask.sum(1).tolist()
        if len(run) == self.num_rows:
            self._forward(batch["input_ids"], position_ids, self.lvlm.adapter.forward_inputs(batch))
        else:
            if run:
                self._forward_rows(batch, position_ids, run)
            ran = {i: n for n, i in enumerate(run)}  # a row run here -> its row in the forward's output
            layers: list[tuple[torch.Tensor, torch.Tensor]] = []
            # one layer's keys / values of some row, for the shapes: a row run here, else a stored one
            shapes = ([(layer.keys[0], layer.values[0]) for layer in self.cache.layers] if run
                      else next(s for s in stored if s is not None)[0])
            for li, (k0, v0) in enumerate(shapes):
                k = k0.new_zeros(len(kept), k0.shape[0], width, k0.shape[2])
                v = v0.new_zeros(len(kept), v0.shape[0], width, v0.shape[2])
                for j, d in enumerate(kept):
                    i = rows_of[d]
                    if stored[j] is None:
                        layer = self.cache.layers[li]
                        k[j], v[j] = layer.keys[ran[i]], layer.values[ran[i]]
                    else:
                        sk, sv = stored[j][0][li]
                        k[j, :, width - sk.shape[1]:], v[j, :, width - sv.shape[1]:] = sk, sv
                layers.append((k, v))
            logits = torch.stack([self.logits[ran[rows_of[d]]] if s is None else s[1] for d, s in zip(kept, stored)])
            idx = torch.tensor(inverse, device=logits.device)
            self.cache = full_cache()
            for li, (k, v) in enumerate(layers):
                self.cache.update(k[idx], v[idx], li)
            self.logits = logits[idx]
        if recent is not None:
            for i in run:
                n = int(lengths[i])
                recent.put(digests[i], [(layer.keys[i, :, width - n:].clone(), layer.values[i, :, width - n:].clone())
                                        for layer in self.cache.layers], self.logits[i].clone())

    def _forward_rows(self, batch: dict[str, torch.Tensor], position_ids: torch.Tensor, rows: list[int]) -> None:
        """Prefill only ``rows`` of the group (at the group's key width): their keys, values and logits."""
        idx = torch.tensor(rows, device=self.lvlm.device)
        sub = {"input_ids": batch["input_ids"][idx], "attention_mask": batch["attention_mask"][idx]}
        slices = iter(self.lvlm.adapter.image_pixel_slices(batch))
        own = [[next(slices) for _ in range(_num_images(r))] for r in self.rows]
        parts = [batch["pixel_values"][sl] for i in rows for sl in own[i]]
        if parts:
            sub["pixel_values"] = torch.cat(parts)
        full_mask, self.mask = self.mask, sub["attention_mask"]
        try:
            self._forward(sub["input_ids"], position_ids[idx], self.lvlm.adapter.forward_inputs(sub))
        finally:
            self.mask = full_mask

    def _transform_pixels(self, batch: dict[str, torch.Tensor]) -> None:
        """Apply branches' pixel transforms to their own image's processed pixels."""
        if not any(r.pixel_transform for r in self.rows):
            return
        slices = iter(self.lvlm.adapter.image_pixel_slices(batch))
        pixels = batch["pixel_values"].clone()
        for r in self.rows:
            for _ in range(_num_images(r)):
                sl = next(slices)
                if r.pixel_transform is not None:
                    pixels[sl] = r.pixel_transform(pixels[sl])
        batch["pixel_values"] = pixels

    # ------------------------------------------------------------------ forwards
    def _forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, extra: dict[str, torch.Tensor]) -> None:
        for e in self.entries:
            e.ctx.step = e.step  # type: ignore[union-attr]
        try:
            with use_plan(self.plan), use_backend(self.backend):
                out = self.lvlm.adapter.forward(input_ids=input_ids, attention_mask=self.mask,
                                                position_ids=position_ids, cache=self.cache, use_cache=True,
                                                logits_to_keep=1, **extra)
        finally:
            for e in self.entries:
                e.ctx.step = NOT_RUNNING  # type: ignore[union-attr]
        self.cache = out.cache
        self.logits = out.logits[:, -1].float()
        self._collect_stats(int(input_ids.shape[1]))

    def decode(self) -> None:
        """One step: every row is fed its chosen token (compiled when the batch asks and can, else eager)."""
        adapter = self.lvlm.adapter
        for e in self.entries:
            e.step += 1
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.num_rows, 1)], 1)
        pos = adapter.next_position_ids(self.pos)
        ids = self.next_ids.view(-1, 1).to(self.lvlm.device)
        if self.compile and self._compiled_step(ids, pos):
            kind = "compiled"
        else:
            self._forward(ids, pos, {})
            kind = "eager"
        for e in self.entries:
            if e.compile:
                e.steps[kind] += 1
                if kind == "eager" and e.eager_because is None:
                    e.eager_because = "batched with requests that did not ask for the compiled step"
        self.pos = adapter.last_positions(pos)

    def _compiled_step(self, ids: torch.Tensor, pos: torch.Tensor) -> bool:
        """Run this step compiled (True), or record why not and leave it to the eager step (False)."""
        reason = why_not(self) if self.static is None else None
        if reason is None:
            try:
                if self.static is None:
                    remaining = max(e.decode.max_new_tokens - len(e.tokens) for e in self.entries)
                    self.static = StaticDecode(self, self.num_keys + remaining)
                    self.cache = full_cache()  # the copy holds the keys now
                for e in self.entries:
                    e.ctx.step = e.step  # type: ignore[union-attr]
                try:
                    self.logits = self.static.step(ids, pos)
                finally:
                    for e in self.entries:
                        e.ctx.step = NOT_RUNNING  # type: ignore[union-attr]
                return True
            except NotCapturable as exc:
                reason = str(exc)
            except Exception as exc:  # a failed trace (dynamo / inductor): the eager step computes the same
                inner = getattr(exc, "inner_exception", None) or exc  # dynamo wraps a compiler's own error
                lines = [line for line in str(inner).splitlines() if line.strip()] or [""]
                reason = f"the trace failed ({type(inner).__name__}: {lines[0][:160]})"
            self.compile = False  # one failure is enough: this batch decodes eagerly from now on
            self._leave_static()
        for e in self.entries:
            e.eager_because = reason
        return False

    def _leave_static(self) -> None:
        """Back to a DynamicCache before a row operation (or the eager step)."""
        if self.static is not None:
            self.cache = self.static.to_dynamic(self.lvlm.model.config)
            self.static = None

    def _collect_stats(self, num_queries: int) -> None:
        """Move this forward's statistics of each entry's main row (padding removed) into the entry."""
        out = self.plan.stats_out
        if not (out.segment_mass or out.last_row):
            return
        first_query = self.num_keys - num_queries
        for e in self.entries:
            row = e.ctx.main_row  # type: ignore[union-attr]
            pad = self.plan.layouts[row].pad
            q0 = max(pad - first_query, 0)
            for l, ms in out.segment_mass.items():
                e.stats_acc["segment_mass"].setdefault(l, []).append(ms[-1][row][:, q0:])
            for l, ms in out.last_row.items():
                e.stats_acc["last_row"].setdefault(l, []).append(ms[-1][row, :, pad:])
        out.segment_mass.clear()
        out.last_row.clear()

    # ------------------------------------------------------------------ tokens
    def choose(self) -> list[tuple[Entry, TokenEvent]]:
        """Choose each active entry's token from the last forward's logits; rows no longer needed leave."""
        assert self.logits is not None
        events: list[tuple[Entry, TokenEvent]] = []
        chosen: dict[int, int] = {}
        pad_id = self.lvlm.adapter.pad_token_id
        for e in self.entries:
            if not e.active:
                continue
            token = select_token(e.combined_logits(self.logits), e.decode, e.generator)
            chosen[id(e)] = token
            events.append((e, e.accept(token, self.lvlm)))
        self.logits = None
        self.next_ids = torch.tensor([chosen.get(id(r.entry), pad_id) for r in self.rows], dtype=torch.long)
        self.drop_inactive()
        return events

    def drop_inactive(self) -> None:
        """Rows of finished / cancelled / failed requests and branches past their ``until_step`` leave."""
        keep = [i for i, r in enumerate(self.rows)
                if r.entry.active and (r.until_step is None or r.until_step > r.entry.step)]
        if len(keep) < len(self.rows):
            self.select(keep)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows (in this order): cache, mask, positions, plan, each request's row map; then
        drop the key columns that became padding in every row (compaction)."""
        self._leave_static()
        self.entries = [e for e in self.entries if any(self.rows[i].entry is e for i in keep)]
        if not keep:
            self.rows = []
            return
        idx = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(idx)
        self.mask = self.mask.index_select(0, idx)
        self.pos = self.pos.index_select(self.pos.ndim - 2, idx)
        self.next_ids = self.next_ids.index_select(0, idx.cpu())
        self.plan.select_rows(keep)
        new_index = {old: new for new, old in enumerate(keep)}
        self.rows = [self.rows[i] for i in keep]
        for e in self.entries:
            ctx = e.ctx
            assert ctx is not None
            ctx.rows = {name: new_index[row] for name, row in ctx.rows.items() if row in new_index}
            ctx.layouts, ctx.plan = self.plan.layouts, self.plan
        self.compact()

    def compact(self) -> None:
        """Drop leading key columns that are padding in every row."""
        n = min(lay.pad for lay in self.plan.layouts)
        if n <= 0:
            return
        self._leave_static()
        for layer in _layers(self.cache):
            layer.keys, layer.values = layer.keys[:, :, n:], layer.values[:, :, n:]
        self.mask = self.mask[:, n:]
        self.plan.trim_left(n)
        for e in self.entries:
            e.ctx.layouts = self.plan.layouts  # type: ignore[union-attr]

    # ------------------------------------------------------------------ joining
    def _widen(self, num_keys: int) -> None:
        self._leave_static()
        n = num_keys - self.num_keys
        self.plan.extend_prompt(self.num_keys)
        self.plan.pad_left(n)
        if n:
            for layer in _layers(self.cache):
                _pad_layer(layer, n)
            self.mask = torch.cat([self.mask.new_zeros(self.num_rows, n), self.mask], 1)

    def join(self, other: Batch) -> None:
        """Append ``other``'s rows (both batches: tokens chosen, not yet fed; same key)."""
        if other.key != self.key:
            raise ValueError("join: batches of different backends or statistics")
        self._leave_static()
        other._leave_static()
        compile_both = self.compile and other.compile
        if not self.rows:
            self.__dict__.update(other.__dict__)
            return
        if not other.rows:
            return
        L = max(self.num_keys, other.num_keys)
        self._widen(L)
        other._widen(L)
        for mine, theirs in zip(_layers(self.cache), _layers(other.cache)):
            mine.keys = torch.cat([mine.keys, theirs.keys])
            mine.values = torch.cat([mine.values, theirs.values])
        self.mask = torch.cat([self.mask, other.mask])
        self.pos = torch.cat([self.pos, other.pos], self.pos.ndim - 2)
        self.next_ids = torch.cat([self.next_ids, other.next_ids])
        offset = self.num_rows
        self.plan = AttentionPlan.concatenate(self.plan, other.plan)
        self.rows = self.rows + other.rows
        for e in other.entries:
            e.ctx.rows = {name: row + offset for name, row in e.ctx.rows.items()}  # type: ignore[union-attr]
        self.entries = self.entries + other.entries
        for e in self.entries:
            e.ctx.plan, e.ctx.layouts = self.plan, self.plan.layouts  # type: ignore[union-attr]
        self.compile = compile_both

    def fail(self, exc: BaseException) -> list[Entry]:
        """End every entry of the batch (hooks removed); returns them for the runner to report."""
        entries = self.entries
        for e in entries:
            e.remove_hooks()
        self.entries, self.rows = [], []
        return entries
