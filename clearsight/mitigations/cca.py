"""CCA: Concentric Causal Attention (Xing, Li, Laptev, Lu, NeurIPS 2024; code xing0047/cca-llava).

Needs a checkpoint trained with CCA (e.g. cca-llava-1.5-7b): on a stock checkpoint the positions
and mask differ from what the model was trained with, so a clear warning is emitted unless the
model config says so (``config.clearsight_trained_with`` containing "cca", or ``config.cca``) or
the user asserts it with ``trained=true``.

Paper Sec. 3 (Eq. 4-6), for an image token grid of R x C cells:
- ring of cell (i, j): ``c = min(i, j, R-1-i, C-1-j)`` (0 = outermost; the centre is nearest the text);
- position ids: prefix text ``0..P-1``; image token -> ``P + c``; the text after the image continues
  at ``P + n_rings`` (``P + n/2`` for an even n x n grid, 12 for 24 x 24); generated tokens continue
  from there (the decoding loop adds 1 per step);
- mask inside the image block: image query q sees image key k iff ``c(k) <= c(q)``; everything
  else causal. With the plan's rank/limit mask: image keys get rank ``s + c``, image queries limit
  ``s + c`` (s = image start); every other token keeps rank = limit = its index.

Works for any grid size (the released code hard-codes 576 tokens). One image per row; LLaVA-1.5
layouts only: LLaVA-NeXT's image span is a base grid plus anyres tiles with newline tokens (no
concentric layout defined) and Qwen2-VL uses 3-D M-RoPE positions, so both are refused clearly.

Composition: the positions and the mask are written for every row of the request that receives
edits (``RequestContext.edit_rows``: the main row and other mitigations' branch rows, e.g. VCD's
noised image, AGLA's masked view, CausalMM's counterfactual rows) from that row's own layout
(padding, image span, grid); rows without an image (M3ID's or PAI's no-image rows) keep the plain
causal mask and positions. Not combinable with modality-mutual attention (``mma``): both own the
prompt mask, refused with a ``PlanConflictError`` naming both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field

from clearsight.errors import InputError
from clearsight.kernels.plan import RowLayout, default_position_ids
from clearsight.mitigations.base import Mitigation, RequestContext
from clearsight.mitigations.pai import image_rows
from clearsight.mitigations.registry import register


class UntrainedCheckpointWarning(UserWarning):
    """A method that needs a checkpoint trained with it was applied to one that (as far as we know) was not."""


def trained_with(ctx: RequestContext, method: str, asserted: bool) -> bool:
    """Whether the user asserts, or the model config records, training with ``method``."""
    if asserted:
        return True
    cfg = ctx.lvlm.model.config
    recorded = getattr(cfg, "clearsight_trained_with", None) or ()
    return method in recorded or bool(getattr(cfg, method, False))


def untrained_reason(method: str, asserted: bool, config: Mapping[str, Any]) -> str | None:
    """``cannot_act_on`` of a method that needs a checkpoint trained with it (same rule as ``trained_with``)."""
    recorded = config.get("clearsight_trained_with") or ()
    if asserted or method in recorded or config.get(method):
        return None
    return f"{method} needs a checkpoint trained with it and this model's config does not record one"


def warn_untrained(ctx: RequestContext, method: str, title: str, example: str, asserted: bool) -> None:
    if trained_with(ctx, method, asserted):
        return
    ctx.warn(
        f"{method}: {title} changes the attention a model was trained with; "
        f"'{ctx.lvlm.spec.source}' is not known to be trained with it (e.g. {example}), so expect degraded output. "
        f"If it is, pass {method}:trained=true or set clearsight_trained_with=['{method}'] in its config.",
        UntrainedCheckpointWarning,
    )


def ring_levels(rows: int, cols: int) -> torch.Tensor:
    """Concentric ring of each grid cell in row-major order, [rows * cols]: min(i, j, R-1-i, C-1-j)."""
    i = torch.arange(rows).view(-1, 1)
    j = torch.arange(cols).view(1, -1)
    c = torch.minimum(torch.minimum(i, j), torch.minimum(rows - 1 - i, cols - 1 - j))
    return c.reshape(-1)


def cca_tables(layout: RowLayout, length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(position_ids, k_rank, q_limit), each [length], of one left-padded row with one image grid."""
    if len(layout.image_spans) != 1:
        raise InputError(f"cca needs exactly one image per row, got {len(layout.image_spans)}")
    (s, e), (R, C) = layout.image_spans[0], layout.grids[0]
    if e - s != R * C:
        raise InputError(
            f"cca: the image span has {e - s} tokens but the grid is {R}x{C}: the ring layout is defined for one "
            "plain grid of patches (LLaVA-1.5 style), not anyres tiles with newline tokens (LLaVA-NeXT)"
        )
    ring = ring_levels(R, C)
    n_rings = int(ring.max()) + 1
    pad = torch.tensor([layout.pad])
    pos = default_position_ids(pad, length)[0].clone()
    prefix = s - layout.pad  # P
    pos[s:e] = prefix + ring
    pos[e:] = prefix + n_rings + torch.arange(length - e)
    rank = torch.arange(length)
    limit = rank.clone()
    rank[s:e] = s + ring
    limit[s:e] = s + ring
    return pos, rank, limit


@register
class CCA(Mitigation):
    name: Literal["cca"] = "cca"
    summary = "CCA (Xing et al. 2024): concentric ring positions + ring-causal image mask (needs a CCA checkpoint)"
    kind = "plan"
    plan_fields = {"mask": "makes the image block ring-causal", "position ids": "gives image tokens ring positions"}

    trained: bool = Field(False, description="assert the checkpoint was trained with CCA (silences the warning)")

    def cannot_act_on(self, config: Mapping[str, Any]) -> str | None:
        return untrained_reason("cca", self.trained, config)

    def apply(self, ctx: RequestContext) -> None:
        adapter = ctx.lvlm.adapter
        if not (adapter.single_grid_per_image and adapter.plain_1d_positions):
            raise InputError(
                f"cca is not supported for {adapter.family}: it needs one plain token grid per image and 1-D position "
                "ids (LLaVA-1.5); anyres tiles and M-RoPE's 3-D positions have no concentric layout"
            )
        if not adapter.causal_image_tokens:
            raise InputError(f"cca is not supported for {adapter.family}: its image tokens attend to their whole "
                             "image at prefill, a prompt mask that CCA's ring-causal mask would replace")
        warn_untrained(ctx, "cca", "concentric causal attention", "xing0047/cca-llava-1.5-7b", self.trained)
        rows = image_rows(ctx)  # rows without an image (text-only request, no-image branches): nothing concentric
        if not rows:
            return
        tables = [cca_tables(ctx.layouts[row], ctx.plan.prompt_len) for row in rows]  # each row's own span, padding
        pos, rank, limit = (torch.stack(t) for t in zip(*tables))
        ctx.plan.set_position_ids(rows, pos, owner=self.name)
        ctx.plan.set_mask(rows, rank, limit, owner=self.name)
