"""Imbalanced-attention fix (Arif et al., "Fixing Imbalanced Attention to Mitigate In-Context
Hallucination of LVLM", arXiv 2501.12206; v3 "PAINT"; code hasanar1f/PAINT, a fork of PAI's code).

1. Dual-stream token selection (paper Sec. 3.1), once per image, from the vision tower's own
   attention (the adapter's ``vision_cls_attentions``, remembered per image; CLS first):
   - local tokens: the top ``local_ratio`` (25 %) of patches by CLS->patch attention at vision layer
     ``local_layer`` (0), summed over heads;
   - summary tokens: patches whose CLS->patch attention at vision layer ``summary_layer``, summed over
     heads, is an upper IQR outlier. Default -2, PAINT's code (``output_attentions[-2]``), which is
     LLaVA-1.5's feature layer; ``summary_layer=feature`` takes the model's own feature layer (the
     config's ``vision_feature_layer``: -1 on the demo model, where the two choices give different
     tokens). It is an upper IQR outlier (> Q3 + 1.5 IQR; the code takes the top-k with k the
     outlier count, the same set up to ties);
   - local := local minus summary;
   - spatial stream (optional, ``spatial_ratio`` > 0, off by default): ``round(ratio * n)`` patches
     spread evenly over the grid (row-major ``linspace``), boosted like local tokens. (The released
     code's spatial score is degenerate and never wired in: this is our even-spread reading.)
2. Boost (Sec. 3.2; the code's modified attention): layers 2..L-1, all heads, the predicting row
   (last prompt row, then every generated row): ``s += alpha |s|`` on local keys (0.7),
   ``s += beta |s|`` on summary keys (0.4 paper, 0.3 code).
3. Head-specific modulation (the paper's second component, absent from the released code). Rule
   chosen and used here: once per request, a probe prefill of the same request (its prompt and image)
   without any edit measures each head's image attention mass m[l, h] at the last prompt row (the plan's
   segment-mass statistics). Per layer, heads are ranked by m (r = 0 least visual .. H-1 most) and
   the local boost of head h becomes ``alpha_h = alpha * (1 + head_spread * (2 r / (H-1) - 1))``:
   the mean over heads stays alpha, vision-attuned heads get up to ``(1 + head_spread) alpha``, the
   least visual ``(1 - head_spread) alpha``. head_spread = 0 is the released code (no probe run).

Plan encoding: the plan's abs-bias is per key segment, so in the boosted layers this method
relabels the row's image keys: local (and spatial) -> IMAGE (alpha_h), summary -> IMAGE_SINK
(beta), unselected image keys -> TEXT (no boost). That per-layer segment override is exclusive:
combining with VAR (which owns the same layers' segments) is rejected with a clear message; PAI's
boost on those layers then reaches only the selected keys. Statistics of those layers report the
relabelled classes.

Families: LLaVA-1.5; LLaVA-NeXT (the selection uses the base image and boosts its base grid, the
first rows x cols tokens of the span; anyres tiles are not boosted). Qwen2-VL's tower has no CLS
token: refused with a clear error. alpha = beta = 0 writes nothing.
Composition: the selection is computed once, from the request image (the main row), and applied
to every row that receives edits (``RequestContext.edit_rows``) and carries an image on the same
token grid (e.g. VCD's noised image, AGLA's masked view: the same tokens of the same grid are
boosted, each row at its own padding), with the same per-head boosts; rows without an image (M3ID's
or PAI's no-image rows) get nothing; a branch image on another token grid is refused (InputError).
Impossible combinations, refused with a ``PlanConflictError`` naming both methods: VAR (both own the
per-layer key segments) and CausalMM's LLM-level counterfactual rows (its counterfactual replaces the
distribution over the image keys, which this method relabels; refused before the prefill).
Known risk (paper ablation): at alpha = 0.7 captions get roughly twice as long; report length with CHAIR.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from clearsight.errors import InputError
from clearsight.kernels.plan import QueryRows, Segment
from clearsight.mitigations.base import MAIN, Mitigation, RequestContext, conflict, plan_owner
from clearsight.mitigations.pai import LayerList, boost_layers
from clearsight.mitigations.registry import register


def cls_attention(att: torch.Tensor) -> torch.Tensor:
    """[heads, T, T] vision attention of one image (or its CLS rows, [heads, T]) -> CLS->patch attention summed
    over heads [T-1]."""
    return (att[:, 0, 1:] if att.ndim == 3 else att[:, 1:]).float().sum(0)


def select_tokens(local_scores: torch.Tensor, summary_scores: torch.Tensor, local_ratio: float,
                  spatial_ratio: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(local, summary, spatial) patch indices of one image (dual-stream selection, Sec. 3.1)."""
    n = local_scores.numel()
    k = int(n * local_ratio)
    local = torch.topk(local_scores, k).indices if k > 0 else torch.zeros(0, dtype=torch.long)
    q1, q3 = torch.quantile(summary_scores, 0.25), torch.quantile(summary_scores, 0.75)
    summary = torch.nonzero(summary_scores > q3 + 1.5 * (q3 - q1)).flatten()
    local = local[~torch.isin(local, summary)]
    m = int(round(spatial_ratio * n))
    spatial = torch.linspace(0, n - 1, m).round().long().unique() if m > 0 else torch.zeros(0, dtype=torch.long)
    return local.sort().values, summary.sort().values, spatial


def head_alphas(image_mass: torch.Tensor, alpha: float, spread: float) -> torch.Tensor:
    """Head-specific modulation: [H] image masses -> [H] boosts, ranked (see the module docstring)."""
    H = image_mass.numel()
    if spread == 0.0 or H == 1:
        return torch.full((H,), float(alpha))
    rank = torch.argsort(torch.argsort(image_mass, stable=True), stable=True).float()
    return alpha * (1.0 + spread * (2.0 * rank / (H - 1) - 1.0))


@register
class Imbalanced(Mitigation):
    name: Literal["imbalanced"] = "imbalanced"
    summary = ("imbalanced-attention fix / PAINT (Arif et al. 2025): boost local + summary image tokens chosen by "
               "the vision tower, per-head by visual sensitivity")
    kind = "plan"
    first_plan_layer = 2  # default layers 2..L-1
    plan_fields = {"segments": "relabels the image keys per layer as local, summary or text"}
    refuses_plan_fields = {"counterfactual": "relabels the unselected image keys of those rows as text, so the "
                                             "counterfactual would miss them"}
    abs_bias_rows = QueryRows.LAST

    alpha: float = Field(0.7, ge=0.0, description="boost s += alpha*|s| on local tokens (mean over heads)")
    beta: float = Field(0.4, ge=0.0, description="boost on summary tokens (0.4 paper, 0.3 code)")
    local_ratio: float = Field(0.25, ge=0.0, le=1.0, description="share of patches taken as local tokens")
    spatial_ratio: float = Field(0.0, ge=0.0, le=1.0, description="evenly spread spatial tokens (0 = off; paper 0.05)")
    local_layer: int = Field(0, description="vision layer of the local stream's CLS attention")
    summary_layer: int | Literal["feature"] = Field(
        -2, description="vision layer of the summary stream: -2 (PAINT's code; LLaVA-1.5's feature layer) or "
        "feature (the model's vision_feature_layer)")
    head_spread: float = Field(0.5, ge=0.0, le=1.0,
                               description="head modulation: alpha_h = alpha*(1 +- spread) by image-mass rank")
    layers: LayerList = Field(None, description="boosted layers (default 2..L-1)")

    def edits_plan(self) -> bool:
        return self.alpha != 0.0 or self.beta != 0.0

    def _image_index(self, ctx: RequestContext, row: int) -> int:
        return sum(1 for r in range(row) if ctx.layouts[r].image_spans)

    def apply(self, ctx: RequestContext) -> None:
        if self.alpha == 0.0 and self.beta == 0.0:
            return
        adapter = ctx.lvlm.adapter
        row = ctx.rows[MAIN]
        layout = ctx.layouts[row]
        if not layout.image_spans:
            return
        if not adapter.image_grid_2d:
            raise InputError(f"imbalanced: not supported for {adapter.family}: its token selection maps the vision "
                             "tower's CLS->patch attention onto a 2-D grid of image tokens, and this family's image "
                             "tokens are learned queries")
        if not adapter.has_cls_vision_attention:
            raise InputError(f"imbalanced: not supported for {adapter.family}: its token selection needs the vision "
                             "tower's CLS->patch attention, and this tower has no CLS token")
        if len(layout.image_spans) != 1:
            raise InputError("imbalanced: one image per request")
        pixels = ctx.inputs["pixel_values"][self._image_index(ctx, row)]
        if pixels.ndim == 4:  # LLaVA-NeXT: [tiles, 3, H, W], the base image first
            pixels = pixels[:1]
        else:
            pixels = pixels.unsqueeze(0)
        atts = adapter.vision_cls_attentions(pixels)  # [1, heads, T] per layer, once per image
        summary_layer = self.summary_layer
        if summary_layer == "feature":
            summary_layer = adapter.vision_feature_attention_index
            if summary_layer is None:
                raise InputError("imbalanced: summary_layer=feature needs the model config's vision_feature_layer "
                                 "(an int); give the layer index instead")
        for field, layer in (("local_layer", self.local_layer), ("summary_layer", summary_layer)):
            if not -len(atts) <= layer < len(atts):
                raise InputError(f"imbalanced: {field}={layer} is out of range: the vision tower has {len(atts)} "
                                 f"layers ({-len(atts)}..{len(atts) - 1})")
        local, summary, spatial = select_tokens(cls_attention(atts[self.local_layer][0]),
                                                cls_attention(atts[summary_layer][0]),
                                                self.local_ratio, self.spatial_ratio)
        (R, C) = layout.grids[0]
        if local.numel() and int(local.max()) >= R * C or summary.numel() and int(summary.max()) >= R * C:
            raise InputError(f"imbalanced: vision tower has more patches than the {R}x{C} token grid")
        ctx.state["imbalanced"] = {"local": local.tolist(), "summary": summary.tolist(), "spatial": spatial.tolist()}
        rows = self._target_rows(ctx, (R, C))
        segs = []
        for row in rows:  # each row's own padding: the selection sits at that row's image span
            (s, e), = ctx.layouts[row].image_spans
            seg = ctx.plan.segment[row].clone()
            seg[s:e] = Segment.TEXT
            seg[s + torch.cat([local, spatial])] = Segment.IMAGE
            seg[s + summary] = Segment.IMAGE_SINK
            segs.append(seg)
        seg_rows = torch.stack(segs)
        ctx.state["imbalanced"]["rows"] = dict(zip([n for n, r in ctx.edit_names.items() if r in rows], rows))
        layers = boost_layers(self.layers, ctx.plan.num_layers)
        alphas = self._alphas(ctx, layers)
        for layer in layers:
            ctx.plan.set_segments(layer, rows, seg_rows, owner=self.name)
            if self.alpha:
                ctx.plan.add_abs_bias([layer], rows, Segment.IMAGE, alphas[layer], QueryRows.LAST, owner=self.name)
            if self.beta:
                ctx.plan.add_abs_bias([layer], rows, Segment.IMAGE_SINK, self.beta, QueryRows.LAST, owner=self.name)

    def _target_rows(self, ctx: RequestContext, grid: tuple[int, int]) -> list[int]:
        """The rows the selection applies to: the main row and every edit row with an image on the same token grid.

        Rows without an image get nothing; a branch image on another grid cannot take the selection: refused.
        """
        rows = []
        for name, row in ctx.edit_names.items():
            layout = ctx.layouts[row]
            if not layout.image_spans:
                continue
            if len(layout.image_spans) != 1 or layout.grids[0] != grid:
                got = "x".join(map(str, layout.grids[0])) if len(layout.image_spans) == 1 else \
                    f"{len(layout.image_spans)} images"
                raise InputError(
                    f"imbalanced: branch row '{name}' carries an image on a {got} token grid, not the request "
                    f"image's {grid[0]}x{grid[1]}: the token selection cannot be transferred; drop imbalanced or "
                    f"'{name.split('.')[0]}'")
            rows.append(row)
        return rows

    def install(self, ctx: RequestContext) -> Any | None:
        """After every request's ``apply``: refuse a counterfactual (CausalMM) on a row this method relabelled."""
        rows = ctx.state.get("imbalanced", {}).get("rows")
        if not rows:
            return None
        for layer in boost_layers(self.layers, ctx.plan.num_layers):
            for name, row in rows.items():
                other = plan_owner(ctx.plan, "counterfactual", layer, row)
                if other is not None and other != self.name:
                    raise conflict(
                        self.name, other, f"image keys (layer {layer}, row '{name}')",
                        f"'{other}' replaces the attention over the image keys of its counterfactual rows, and "
                        f"'{self.name}' relabels the unselected image keys of the same rows as text, so the "
                        "counterfactual would miss them")
        return None

    def prepare(self, ctx: RequestContext) -> None:
        """The head-sensitivity probe, before the request's rows exist, so the scheduler can batch it with other
        requests' probes (``Probe``'s ``batched``); ``apply`` reads it from ``ctx.state``."""
        adapter = ctx.lvlm.adapter
        if (self.head_spread == 0.0 or self.alpha == 0.0 or ctx.image is None or not adapter.image_grid_2d
                or not adapter.has_cls_vision_attention):
            return  # no probe needed, or apply refuses the request before it would read one
        ctx.state["imbalanced.probe"] = self._probe(ctx, boost_layers(self.layers, adapter.num_layers))

    def _probe(self, ctx: RequestContext, layers: list[int]) -> Any:
        from clearsight.config import DecodeSpec
        from clearsight.kernels.plan import StatsRequest

        req = {"prompt": ctx.request.prompt, "image": ctx.image}
        return ctx.run_probe([req], decode=DecodeSpec(max_new_tokens=1),
                             stats=StatsRequest(segment_mass=True, layers=frozenset(layers)), batched=True)[0]

    def _alphas(self, ctx: RequestContext, layers: list[int]) -> dict[int, Any]:
        if self.head_spread == 0.0 or self.alpha == 0.0:
            return {layer: self.alpha for layer in layers}
        probe = ctx.state.get("imbalanced.probe")
        if probe is None:
            probe = self._probe(ctx, layers)
        assert probe.stats is not None
        out: dict[int, Any] = {}
        ctx.state["imbalanced.image_mass"] = {}
        for layer in layers:
            m = probe.stats["segment_mass"][layer][:, -1]  # [H, S] at the last prompt row
            mass = m[:, Segment.IMAGE] + m[:, Segment.IMAGE_SINK]
            ctx.state["imbalanced.image_mass"][layer] = mass
            out[layer] = head_alphas(mass, self.alpha, self.head_spread)
        return out
