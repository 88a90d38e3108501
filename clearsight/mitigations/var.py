"""VAR: Visual Attention Redistribution (Kang, Kim, Kim, Hwang, "See What You Are Told: Visual Attention
Sink in Large Multimodal Models", ICLR 2025; code seilk/VisAttnSink).

1. Sink tokens (paper Sec. 3, Eq. 2), per layer l in the chosen layers, found once at prefill from
   the hidden state x entering layer l (the adapter's ``hook_layer_inputs``):
   ``phi(x) = max_{d in D} |x_d / rms(x)|`` (weight-free RMS, eps 1e-6); a token is a sink iff
   ``phi > tau`` (tau = 20). Image sinks become IMAGE_SINK, text sinks (BOS) TEXT_SINK in the
   plan's per-layer segments; generated tokens are never sinks (the sets are reused at decode).
   D comes from ``sink_dims``, else the adapter's per-family table (keyed by hidden size), else a
   calibration on the request's own prefill (dimensions with massive activations on a few tokens,
   see ``find_sink_dims``), reported with a warning and in ``ctx.state["var"]``.
2. Image-centric heads (Sec. 4.1, Eq. 4), per (layer, head, query row), at prefill and every decode
   step: image mass ``S_img >= 0.2`` and non-sink share ``S_ns / S_img >= rho`` (rho = 0.5). Only
   rows after the image at prefill; layers 2..L-2 (the last layer excluded); a layer without any
   visual sink is left untouched.
3. Redistribution (Sec. 4.2, Eq. 5-6) on the selected rows: sinks keep ``1 - p`` of their weight,
   the removed mass goes to the non-sink image keys in proportion to their weight; row mass is
   preserved. Executed exactly by the plan's ``redistribute`` (the backends compute the segment
   masses and add ``log(1-p)`` / ``log(1 + p S_sink / S_ns)`` to the scores; no attention map is
   materialised).

``p_semantics``: ``paper`` (p = fraction moved, default 0.6) or ``code`` (the released config's p is
the fraction kept, author-confirmed in VisAttnSink issue #5: code p = 0.4 is paper p = 0.6). The switch
also selects the head test: the released code's head test uses the complement of rho (a head is
image-centric when its non-sink share is >= 1 - rho), so ``p_semantics=code`` tests ``S_ns / S_img >=
1 - rho`` (``rho_test``); at the default rho = 0.5 both read the same.
Composition: every row that receives edits (``RequestContext.edit_rows``: the main row and the
branch rows of other mitigations, e.g. VCD's noised image, AGLA's masked view, CausalMM's
counterfactual rows) gets its own sinks, detected from that row's own layer inputs with its own
padding, and its own redistribution; the sink dimensions (table, ``sink_dims`` or the on-the-fly
calibration on the main row) are shared. Rows without an image (M3ID's or PAI's no-image rows) are
left alone. Branch rows' sinks are reported in ``ctx.state["var"]["branch_sinks"][row name]``.
Not combinable with the imbalanced-attention fix (both own the per-layer key segments): refused
with a ``PlanConflictError`` naming both before the prefill.

p = 0 (paper) writes nothing: the tokens are exactly the unmitigated ones.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import Field

from clearsight.errors import InputError
from clearsight.kernels.plan import QueryRows, Segment
from clearsight.mitigations.base import MAIN, Mitigation, Probe, RequestContext, conflict, plan_owner, probe_for
from clearsight.mitigations.pai import LayerList, boost_layers
from clearsight.mitigations.registry import register

EPS = 1e-6


def var_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    """The paper's layers 2..L-2 (``except_last_layer``), or the user's list."""
    if layers is not None:
        return boost_layers(layers, num_layers)
    return list(range(2, num_layers - 1))


def normalized_abs(x: torch.Tensor) -> torch.Tensor:
    """|x / rms(x)| per token, weight-free RMSNorm with eps 1e-6: [..., hidden] -> [..., hidden]."""
    x = x.float()
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)).abs()


def sink_scores(x: torch.Tensor, dims: list[int] | tuple[int, ...]) -> torch.Tensor:
    """phi(x) = max over sink dimensions of |x_d / rms(x)|: [T, hidden] -> [T]."""
    return normalized_abs(x)[..., list(dims)].amax(-1)


def find_sink_dims(hidden: list[torch.Tensor], tau: float = 20.0, max_tokens: float = 0.1, max_dims: int = 4
                   ) -> tuple[list[int], dict[int, int]]:
    """Calibration: dimensions with massive activations on a few tokens (after Sun et al. 2024 and VAR Sec. 3).

    hidden: the layer inputs [T, hidden] of some layers. A dimension is massive in a layer when
    ``|x_d / rms(x)| > tau`` on at least one token and on at most ``max_tokens`` of the tokens (at
    least one). Returns the dimensions massive in the most layers (ties: the larger activation
    first), at most ``max_dims``, and the per-dimension layer counts.
    """
    counts: dict[int, int] = {}
    peak: dict[int, float] = {}
    for x in hidden:
        z = normalized_abs(x)
        over = z > tau
        n = over.sum(0)
        limit = max(1, int(max_tokens * z.shape[0]))
        for d in torch.nonzero((n >= 1) & (n <= limit)).flatten().tolist():
            counts[d] = counts.get(d, 0) + 1
            peak[d] = max(peak.get(d, 0.0), float(z[:, d].max()))
    ranked = sorted(counts, key=lambda d: (-counts[d], -peak[d]))
    return ranked[:max_dims], counts


@dataclass
class SinkCalibration:
    """What ``calibrate_sink_dims`` found: pass ``dims`` as ``var:sink_dims=a|b``."""

    dims: list[int]
    layer_counts: dict[int, int]
    layers: list[int]
    hidden_size: int
    tau: float
    tokens: int = 0
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        if not self.dims:
            return (f"no sink dimensions found (hidden size {self.hidden_size}, layers {self.layers}, tau {self.tau}, "
                    f"{self.tokens} tokens): no massive activations, VAR will find no sinks")
        per = ", ".join(f"{d} (massive in {self.layer_counts[d]}/{len(self.layers)} layers)" for d in self.dims)
        return (f"sink dimensions for hidden size {self.hidden_size}: {per}; use var:sink_dims="
                + "|".join(map(str, self.dims)))


def calibrate_sink_dims(lvlm: Any, requests: list[Any], tau: float = 20.0, layers: list[int] | None = None,
                        max_tokens: float = 0.1, max_dims: int = 4, *, probe: Probe | None = None
                        ) -> SinkCalibration:
    """Find VAR's sink dimensions of an unknown model from the prefill of a few requests.

    The prefills run through ``probe`` (the decoding layer's ``make_probe(lvlm, backend)``); None = the model's
    default probe (``mitigations.base.probe_for``: the decoding layer's, registered when that layer is
    imported, as ``clearsight.generate`` does).
    """
    from clearsight.config import DecodeSpec

    run = probe_for(lvlm, probe)
    adapter = lvlm.adapter
    chosen = var_layers(layers, adapter.num_layers)
    seen: list[torch.Tensor] = []
    tokens = 0
    for req in requests:
        got: dict[int, torch.Tensor] = {}

        def grab(layer: int, x: torch.Tensor, got: dict[int, torch.Tensor] = got) -> None:
            if layer in chosen and layer not in got:
                got[layer] = x[0].detach().clone()

        with adapter.hook_layer_inputs(grab):
            run([req], decode=DecodeSpec(max_new_tokens=1))
        seen.extend(got.values())
        tokens += next(iter(got.values())).shape[0] if got else 0
    dims, counts = find_sink_dims(seen, tau, max_tokens, max_dims)
    return SinkCalibration(dims, counts, chosen, adapter.hidden_size, tau, tokens)


class _Detect:
    """Layer-input hook of one request: find the sinks of each layer at prefill and write the plan."""

    def __init__(self, spec: VAR, ctx: RequestContext, layers: list[int], dims: list[int] | None):
        self.spec, self.ctx, self.layers, self.dims = spec, ctx, set(layers), dims
        self.handle: Any = None

    def __call__(self, layer: int, hidden: torch.Tensor) -> None:
        ctx = self.ctx
        if ctx.step != 0 or layer not in self.layers:
            return None
        state = ctx.state.setdefault("var", {"sinks": {}})
        for name, row in ctx.edit_names.items():  # the main row first: an on-the-fly calibration uses it
            if name != MAIN and not ctx.layouts[row].image_spans:
                continue  # a branch row without an image has no visual sinks: nothing to redistribute
            sinks = self._row(layer, row, hidden[row])
            if sinks is None:
                continue
            if name == MAIN:
                state["sinks"][layer] = sinks
            else:
                state.setdefault("branch_sinks", {}).setdefault(name, {})[layer] = sinks
        return None

    def _row(self, layer: int, row: int, x: torch.Tensor) -> list[int] | None:
        """Sinks of one row from its own layer input x [L, hidden]; writes the row's segments and redistribution."""
        ctx, spec = self.ctx, self.spec
        layout = ctx.layouts[row]
        if self.dims is None:  # unknown model: calibrate on this prefill, once, and say so
            self.dims, _ = find_sink_dims([x[layout.pad:]], spec.tau)
            state = ctx.state.setdefault("var", {"sinks": {}})
            state["sink_dims"] = list(self.dims)
            state["calibrated"] = True
            ctx.warn(
                f"var: no sink-dimension table for hidden size {x.shape[-1]} ({ctx.lvlm.adapter.family}); "
                f"calibrated on this prompt at layer {layer}: {self.dims or 'none found'}. "
                "Fix them with var:sink_dims=a|b (see clearsight.mitigations.var.calibrate_sink_dims).",
            )
        if not self.dims:
            return None
        sink = sink_scores(x, self.dims) > spec.tau
        sink[: layout.pad] = False
        seg = ctx.plan.segment[row].clone()
        image = (seg == Segment.IMAGE) | (seg == Segment.IMAGE_SINK)
        found = torch.nonzero(sink).flatten().tolist()
        if not bool((sink & image).any()):
            return found  # Sec. 4.2: a layer without visual sinks is not modified
        seg[sink & image] = Segment.IMAGE_SINK
        seg[sink & ~image] = Segment.TEXT_SINK
        ctx.plan.set_segments(layer, [row], seg, owner=spec.name)
        ctx.plan.set_redistribute([layer], [row], p_move=spec.p_move, rho=spec.rho_test,
                                  min_image_mass=spec.min_image_mass, query_rows=QueryRows.AFTER_IMAGE,
                                  owner=spec.name)
        return found

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


@register
class VAR(Mitigation):
    name: Literal["var"] = "var"
    summary = "VAR (Kang et al. 2025): move p of the sink attention to non-sink image keys on image-centric heads"
    kind = "plan"
    first_plan_layer = 2  # default layers 2..L-2
    plan_fields = {"segments": "marks its attention sinks in the per-layer key segments",
                   "redistribution": "moves sink attention to the non-sink image keys"}

    p: float = Field(0.6, ge=0.0, le=1.0, description="sink mass moved (paper) or kept (p_semantics=code)")
    p_semantics: Literal["paper", "code"] = Field("paper", description="paper: p is moved; code: p is kept "
                                                  "and the head test uses 1 - rho")
    rho: float = Field(0.5, ge=0.0, le=1.0, description="head test: non-sink share of image mass >= rho "
                       "(p_semantics=code: >= 1 - rho)")
    min_image_mass: float = Field(0.2, ge=0.0, le=1.0, description="head test: image mass >= this")
    tau: float = Field(20.0, gt=0.0, description="sink threshold on max_d |x_d / rms(x)|")
    sink_dims: LayerList = Field(None, description="sink dimensions D (default: adapter table, else calibrate)")
    layers: LayerList = Field(None, description="edited layers (default 2..L-2, the last layer excluded)")

    @property
    def p_move(self) -> float:
        return self.p if self.p_semantics == "paper" else 1.0 - self.p

    @property
    def rho_test(self) -> float:
        """The head test's threshold on the non-sink share: rho (paper), 1 - rho (the released code)."""
        return self.rho if self.p_semantics == "paper" else 1.0 - self.rho

    def edits_plan(self) -> bool:
        return self.p_move != 0.0

    def cannot_act_on(self, config: Mapping[str, Any]) -> str | None:
        # a token is a sink iff max_d |x_d / rms(x)| > tau, and |x_d| <= sqrt(sum x^2) = sqrt(H) rms(x), so with
        # sqrt(hidden size H) <= tau no token can be a sink (Kang et al. 2025, Sec. 4.1)
        hidden = (config.get("text_config") or config).get("hidden_size")
        if self.p_move == 0.0 or not isinstance(hidden, int) or math.sqrt(hidden) > self.tau:
            return None
        return (f"var can find no sinks: |x_d / rms(x)| <= sqrt({hidden}) = {math.sqrt(hidden):.1f}, "
                f"not above tau = {self.tau:g}")

    def install(self, ctx: RequestContext) -> Any | None:
        if self.p_move == 0.0:
            return None
        adapter = ctx.lvlm.adapter
        if self.tau >= adapter.hidden_size**0.5:
            ctx.warn(f"var: tau={self.tau} cannot be reached: |x_d / rms(x)| <= sqrt(hidden size) = "
                     f"{adapter.hidden_size**0.5:.1f}, so no token will be a sink; lower tau")
        dims = self.sink_dims
        if dims is None:
            table = adapter.sink_dimensions.get(adapter.hidden_size)
            dims = list(table) if table is not None else None
        if dims is not None:
            bad = [d for d in dims if not 0 <= d < adapter.hidden_size]
            if bad:
                raise InputError(f"var: sink_dims {bad} out of range for hidden size {adapter.hidden_size}")
            ctx.state.setdefault("var", {"sinks": {}})["sink_dims"] = list(dims)
        layers = var_layers(self.layers, adapter.num_layers)
        self._refuse_segment_owners(ctx, layers)
        hook = _Detect(self, ctx, layers, dims)
        hook.handle = adapter.hook_layer_inputs(hook)
        return hook

    def _refuse_segment_owners(self, ctx: RequestContext, layers: list[int]) -> None:
        """VAR owns the per-layer segments of its rows: refuse, before the prefill, a method that set them
        already (the imbalanced-attention fix), whether or not this prompt turns out to have visual sinks."""
        for layer in layers:
            for row in ctx.edit_rows:
                other = plan_owner(ctx.plan, "segments", layer, row)
                if other is not None and other != self.name:
                    raise conflict(self.name, other, f"segments (layer {layer}, row {row})",
                                   f"VAR marks its sinks in the per-layer key segments, which '{other}' relabels")
