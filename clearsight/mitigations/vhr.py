"""VHR: Vision-aware Head Reinforcement (He et al., "Cracking the Code of Hallucination in LVLMs with
Vision-aware Head Divergence", ACL 2025).

At the first generated step (the prefill's last position) a row without the image runs batched
alongside the main row (a branch). Per layer l in the chosen layers, from the per-head attention
outputs before the output projection (the adapter's ``hook_head_outputs``):

- Eq. 3: ``VHD[l, h] = || A[l, h](with image) - A[l, h](without image) ||_2`` at that position;
- outlier filter (Sec. 4.2): ``VHD[l, h] := 0`` where ``VHD > mean_l + std_l`` AND the text-only
  output's squared norm ``TA[l, h] > mean_l(TA) + std_l(TA)``; the std over the layer's heads is the
  population one (``outlier_std=population``, default; numpy's ``np.std`` default) or the sample one
  (``sample``, torch's ``std`` default). The paper does not say, the released code was not available to
  us, and the choice changes which heads are filtered, hence tokens;
- selection (Eq. 5): heads with VHD above the layer median (numpy-style median, so half the heads);
- reinforcement (Eq. 6): their outputs are multiplied by alpha = 2.

Layer by layer: the hook scales layer l's selected heads of the main row (every prompt position,
so the cached keys of later layers stay consistent with decode) before layer l+1 is measured.
From then on the heads are fixed: they are written into the plan's ``head_scale`` and applied at
every decode step. The text-only row is not reinforced (it is the reference of the divergence).

Layers: the paper's "layer 1 plus the last 14" of LLaVA-1.5 / LLaVA-NeXT (1 and 18..31 of 32);
for another depth L: 1 and max(2, L-14)..L-1.

``text_pass``: ``branch`` (default, the paper's batched no-image row; ``until_step=0``, so it leaves
the batch after the prefill) or ``probe``: the no-image row's head outputs are taken from one
separate text-only prefill before the main prefill. Both give the same selection (the text-only row
never depends on the main row).

Composition: the heads are selected once, from the main row against the no-image measurement, and
that selection is applied to every row of the request that receives edits (``RequestContext.edit_rows``:
the main row and the branch rows of other mitigations, with or without an image, e.g. VCD's noised
image, M3ID's or PAI's no-image row): scaled in the prefill hook layer by layer like the main row,
then through the plan's ``head_scale``. VHR's own no-image row is ``receives_edits=False``: no
mitigation edits it, so it stays the unedited reference of the divergence.

alpha = 1 writes nothing and adds no row: the tokens are exactly the unmitigated ones.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.pai import LayerList, boost_layers
from clearsight.mitigations.registry import register

NOIMG = "noimg"
MEASURE = f"vhr.{NOIMG}"  # the row name of the no-image measurement branch


def vhr_layers(layers: list[int] | None, num_layers: int) -> list[int]:
    if layers is not None:
        return boost_layers(layers, num_layers)
    return sorted({1, *range(max(2, num_layers - 14), num_layers)} & set(range(num_layers)))


def select_heads(with_image: torch.Tensor, without: torch.Tensor, alpha: float, outlier_filter: bool = True,
                 outlier_std: str = "population") -> tuple[torch.Tensor, torch.Tensor]:
    """Head outputs [H, D] of one layer at one position -> (VHD after the filter [H], per-head scale [H])."""
    vhd = (with_image.float() - without.float()).norm(dim=-1)
    if outlier_filter:
        ta = without.float().pow(2).sum(-1)
        c = 0 if outlier_std == "population" else 1
        surge = (vhd > vhd.mean() + vhd.std(correction=c)) & (ta > ta.mean() + ta.std(correction=c))
        vhd = vhd.masked_fill(surge, 0.0)
    chosen = vhd > torch.quantile(vhd, 0.5)
    scale = torch.where(chosen, torch.tensor(float(alpha)), torch.tensor(1.0))
    return vhd, scale


class _Reinforce:
    """The head-output hook of one request: measure and reinforce at prefill, then hand over to the plan."""

    def __init__(self, spec: VHR, ctx: RequestContext, layers: list[int], reference: dict[int, torch.Tensor] | None):
        self.spec, self.ctx, self.layers, self.reference = spec, ctx, set(layers), reference
        self.handle: Any = None

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        ctx = self.ctx
        if ctx.step != 0 or layer not in self.layers:
            return None
        row = ctx.rows[MAIN]
        measure = ctx.rows.get(MEASURE)
        without = self.reference[layer] if self.reference is not None else x[measure, -1]
        vhd, scale = select_heads(x[row, -1], without, self.spec.alpha, self.spec.outlier_filter,
                                  self.spec.outlier_std)
        ctx.state.setdefault("vhr", {})[layer] = {"vhd": vhd.cpu(), "scale": scale.cpu()}
        scale = scale.to(x.device, x.dtype)
        # the main row's selection applies to every row that receives edits (never to the measurement row)
        rows = [r for r in ctx.edit_rows if r != measure]
        ctx.plan.scale_heads(layer, rows, scale)  # decode steps: the plan scales the fixed heads
        out = x.clone()
        out[rows] = out[rows] * scale.view(1, 1, -1, 1)  # this prefill: reinforce before layer l+1 is measured
        return out

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()


@register
class VHR(Mitigation):
    name: Literal["vhr"] = "vhr"
    summary = "VHR (He et al. 2025): scale the vision-aware heads (VHD above the layer median) by alpha"
    kind = "plan"

    alpha: float = Field(2.0, gt=0.0, description="output scale of the selected heads (1 = off)")
    layers: LayerList = Field(None, description="reinforced layers (default 1 and the last 14: 1, 18..31 of 32)")
    outlier_filter: bool = Field(True, description="zero VHD of heads that surge without the image (mean + std rule)")
    outlier_std: Literal["population", "sample"] = Field(
        "population", description="std of the outlier filter over a layer's heads: population (ddof 0) or "
        "sample (ddof 1)")
    text_pass: Literal["branch", "probe"] = Field(
        "branch", description="branch: no-image row batched alongside; probe: one text-only prefill before")

    def _active(self, ctx: RequestContext) -> bool:
        # without an image there is no vision-aware head to find: no row, no hook, tokens unchanged
        return self.alpha != 1.0 and ctx.image is not None

    def branches(self, ctx: RequestContext) -> list[Branch]:
        # the no-image row is needed for the measurement at the prefill only; it then leaves the batch
        # it is a measurement of the unedited model: other mitigations' single-pass edits leave it alone
        return ([Branch(NOIMG, image=None, until_step=0, receives_edits=False)]
                if self._active(ctx) and self.text_pass == "branch" else [])

    def apply(self, ctx: RequestContext) -> None:
        # the probe runs here, before any request of the batch installs its hooks
        if self._active(ctx) and self.text_pass == "probe":
            layers = vhr_layers(self.layers, ctx.lvlm.adapter.num_layers)
            ctx.state["vhr.probe"] = self._probe(ctx, layers)

    def install(self, ctx: RequestContext) -> Any | None:
        if not self._active(ctx):
            return None
        layers = vhr_layers(self.layers, ctx.lvlm.adapter.num_layers)
        reference = ctx.state.get("vhr.probe")
        hook = _Reinforce(self, ctx, layers, reference)
        hook.handle = ctx.lvlm.adapter.hook_head_outputs(hook)
        return hook

    def _probe(self, ctx: RequestContext, layers: list[int]) -> dict[int, torch.Tensor]:
        """Last-position head outputs of a text-only prefill of the same prompt (the request's probe)."""
        from clearsight.config import DecodeSpec

        got: dict[int, torch.Tensor] = {}

        def grab(layer: int, x: torch.Tensor) -> None:
            if layer in layers and layer not in got:
                got[layer] = x[0, -1].clone()

        with ctx.lvlm.adapter.hook_head_outputs(grab):
            ctx.run_probe([{"prompt": ctx.request.prompt}], decode=DecodeSpec(max_new_tokens=1))
        return got
