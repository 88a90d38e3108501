"""CARVE: Contrastive Attention Refinement for Visual Enhancement (Ge et al., "Focusing by Contrastive
Attention: Enhancing VLMs' Visual Reasoning", arXiv 2509.06461; code YuyaoGe/CARVE at a1f04420).

Before the request's generation, two greedy probes of the unmitigated model (one batch of two rows, at most
``probe_tokens`` = 32 tokens each [code]) record, at every step t and in the layers L (paper: decoder layers
20-25), the attention of the last query row over the image tokens, averaged over heads, not renormalised:

- A^Q_{l,t} for the task question Q, A^G_{l,t} for the general question G = "Write a general description of
  the image." (paper App. D); both get the code's suffix "Answer the question using a single word or phrase.".

Contrast (paper Sec. 3; the closed-form minimiser of sum (A~ A^G - A^Q)^2 + lambda sum A~^2 A^G):

    A^_{l,t} = A^Q_{l,t} / (A^G_{l,t} + lambda),   lambda = 1e-8 [code],   t < min(len_Q, len_G)

Fusion (code v4, the default; ``steps=first`` is v3): S = sum_t w_t sum_{l in L} Up(grid(A^_{l,t})), with
w_t = t counted from 1 and Up a bilinear resize to the image region the token grid covers (the whole image,
or LLaVA-1.5's center crop: ``Adapter.grid_box``). Mask: tau = the (1 - p) quantile of S, M0 = {S >= tau};
connected components of M0 (4-connectivity, scipy's default) scored by their summed S; the top
max(K, floor(p * #components)) are kept (the code treats K as a minimum; p = 0.2, K = 3 [code]). Refined
image: the image times the mask (black elsewhere), cropped to the mask's bounding box, enlarged by
max(W / w, H / h) with LANCZOS. The request is then generated with [original, refined] (``final=both``, the
code, as ViCrop) or the refined image alone (``final=refined``, the paper's Alg. 1 literally).

Deviations, stated: the final query keeps the request's prompt as given (the code also appends the suffix:
put it in the prompt to match); the default layers are 20-25 for models with at least 26 decoder layers and
the same fraction of the depth (round(20 L / 32) .. round(25 L / 32)) for smaller ones. The probes run once
per request (two rows in one batch), not cached per image.

Composition: ``final=refined`` replaces the request's image by the refined view, and every other method acts
on it as on any image. ``final=both`` puts two images in one prompt, which the other methods' single-image
edits and branches do not handle: refused with a message naming both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pydantic import Field
from scipy import ndimage

from clearsight.errors import InputError
from clearsight.mitigations._branch_common import require_image
from clearsight.mitigations.base import Mitigation, RequestContext
from clearsight.mitigations.pai import LayerList, boost_layers
from clearsight.mitigations.registry import register

GENERAL_QUESTION = "Write a general description of the image."
CODE_SUFFIX = "Answer the question using a single word or phrase."


def default_layers(num_layers: int) -> list[int]:
    """The paper's decoder layers 20..25 (32-layer models); the same fraction of the depth for smaller models."""
    if num_layers >= 26:
        return list(range(20, 26))
    lo = min(round(20 * num_layers / 32), num_layers - 1)
    hi = min(max(round(25 * num_layers / 32), lo), num_layers - 1)
    return list(range(lo, hi + 1))


def probe_maps(result, layers: list[int], grid_start: Callable[[tuple[int, int], tuple[int, int]], int] | None = None
               ) -> tuple[torch.Tensor, tuple[int, int]]:
    """[T, len(layers), rows * cols] head-mean attention of the last query row of each step over the first
    image's grid tokens (LLaVA-NeXT: its base grid; where ``grid_start`` = ``Adapter.grid_start`` puts it, else
    the span's first token), and the grid (rows, cols), from a probe's statistics."""
    stats = result.stats
    if not stats or not stats.get("last_row"):
        raise InputError("carve needs attention statistics of its probes, which this backend does not record: "
                         "use the torch or reference backend")
    layout = stats["layout"]
    (gr, gc) = layout.grids[0]
    start = grid_start(layout.image_spans[0], (gr, gc)) if grid_start else layout.image_spans[0][0]
    steps = len(stats["last_row"][layers[0]])
    out = torch.stack([
        torch.stack([stats["last_row"][layer][t].float().mean(0)[start - layout.pad: start - layout.pad + gr * gc]
                     for layer in layers])
        for t in range(steps)])
    return out, (gr, gc)


def contrast_maps(task: torch.Tensor, general: torch.Tensor, lam: float) -> torch.Tensor:
    """A^Q / (A^G + lambda) over the steps both probes have (aligned by index)."""
    n = min(task.shape[0], general.shape[0])
    return task[:n].double() / (general[:n].double() + lam)


def fuse(contrast: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """S [H, W] (size = (W, H)) = sum_t t * sum_l bilinear(grid(A^_{l,t})), t counted from 1."""
    W, H = size
    T, nl, _ = contrast.shape
    maps = contrast.view(T * nl, 1, *grid).float()
    up = F.interpolate(maps, size=(H, W), mode="bilinear", align_corners=False).view(T, nl, H, W).double()
    weights = torch.arange(1, T + 1, dtype=torch.float64).view(T, 1, 1, 1)
    return (up * weights).sum((0, 1))


def carve_mask(score: torch.Tensor, p: float, k: int) -> torch.Tensor:
    """Bool [H, W]: pixels at or above the (1 - p) quantile of ``score``, in its top max(K, floor(p * n))
    4-connected components by summed score (n = the number of components)."""
    s = score.double()
    tau = torch.quantile(s.flatten(), 1.0 - p)  # linear interpolation, as numpy's default
    above = (s >= tau).numpy()
    labels, n = ndimage.label(above)  # scipy's default structure: 4-connectivity in 2-D
    if n == 0:
        return torch.from_numpy(above)
    sums = ndimage.sum_labels(s.numpy(), labels, index=np.arange(1, n + 1))
    keep = max(k, math.floor(p * n))
    order = np.argsort(-sums, kind="stable")[:keep] + 1
    return torch.from_numpy(np.isin(labels, order))


def refined_view(image: Image.Image, mask: torch.Tensor, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    """The image times the mask (black elsewhere; ``mask`` covers ``box``, the rest is dropped), cropped to the
    mask's bounding box and enlarged by max(W / w, H / h) with LANCZOS."""
    W, H = image.size
    left, top, right, bottom = box or (0, 0, W, H)
    full = np.zeros((H, W), dtype=bool)
    full[top:bottom, left:right] = mask.numpy()
    arr = np.array(image.convert("RGB"))
    arr[~full] = 0
    ys, xs = np.nonzero(full)
    y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
    crop = Image.fromarray(arr[y0:y1, x0:x1])
    scale = max(W / (x1 - x0), H / (y1 - y0))
    return crop.resize((max(1, round((x1 - x0) * scale)), max(1, round((y1 - y0) * scale))), Image.LANCZOS)


@register
class CARVE(Mitigation):
    name: Literal["carve"] = "carve"
    summary = ("CARVE (Ge et al. 2025): mask the image where task-question attention / general-question attention "
               "is high, re-ask with the refined view")
    kind = "input"
    in_demo = False  # two 32-token probes per request, one request at a time: the demo's slowest system by far

    p: float = Field(0.2, gt=0.0, le=1.0, description="fraction of pixels above the threshold (the (1-p) quantile)")
    k: int = Field(3, ge=1, description="regions kept: the top max(k, floor(p * #components)) by summed score")
    lam: float = Field(1e-8, gt=0.0, description="lambda of the contrast A_Q / (A_G + lambda)")
    layers: LayerList = Field(None, description="decoder layers read (default 20..25, or the same fraction of "
                              "the depth for smaller models)")
    steps: Literal["all", "first"] = Field("all", description="all: every probe step weighted by t (code v4); "
                                           "first: the first step only (v3)")
    probe_tokens: int = Field(32, ge=1, le=256, description="greedy tokens of each probe (steps=all)")
    final: Literal["both", "refined"] = Field("both", description="the re-query's images: both = [original, "
                                              "refined] (the code), refined = the refined view alone (Alg. 1)")
    general: str = Field(GENERAL_QUESTION, description="the general question G of the second probe")
    suffix: str | None = Field(CODE_SUFFIX, description="appended to both probes' questions (none = nothing)")

    def refuses(self, other: Mitigation) -> str | None:
        if self.final == "both" and other.name not in ("none", self.name):
            return (f"carve:final=both asks with two images in one prompt ([original, refined]) and {other.name} "
                    f"acts on a single image; use carve:final=refined to combine them")
        return None

    def _layers(self, num_layers: int) -> list[int]:
        return boost_layers(self.layers, num_layers) if self.layers is not None else default_layers(num_layers)

    def refine(self, ctx: RequestContext) -> tuple[Image.Image, torch.Tensor]:
        """The refined view of the request's image and the mask (over ``Adapter.grid_box``) it keeps."""
        from clearsight.config import DecodeSpec
        from clearsight.kernels.plan import StatsRequest

        assert ctx.image is not None
        if not ctx.lvlm.adapter.image_grid_2d:
            raise InputError(f"carve is not supported for {ctx.lvlm.adapter.family}: its maps are attention over a "
                             "2-D grid of image tokens, and this family's image tokens are learned queries")
        layers = self._layers(ctx.lvlm.adapter.num_layers)
        suffix = " " + self.suffix if self.suffix else ""
        probes = [{"prompt": ctx.request.prompt + suffix, "image": ctx.image},
                  {"prompt": self.general + suffix, "image": ctx.image}]
        tokens = self.probe_tokens if self.steps == "all" else 1
        task, general = ctx.run_probe(probes, decode=DecodeSpec(max_new_tokens=tokens),
                                      stats=StatsRequest(last_row=True, layers=frozenset(layers)))
        start = ctx.lvlm.adapter.grid_start
        (a_q, grid), (a_g, _) = probe_maps(task, layers, start), probe_maps(general, layers, start)
        if self.steps == "first":
            a_q, a_g = a_q[:1], a_g[:1]
        box = ctx.lvlm.adapter.grid_box(ctx.image)
        left, top, right, bottom = box or (0, 0, *ctx.image.size)
        score = fuse(contrast_maps(a_q, a_g, self.lam), grid, (right - left, bottom - top))
        mask = carve_mask(score, self.p, self.k)
        return refined_view(ctx.image, mask, box), mask

    def input_images(self, ctx: RequestContext) -> list[Image.Image] | None:
        require_image(ctx, "carve", "it refines the request's image")
        assert ctx.image is not None
        adapter = ctx.lvlm.adapter
        if self.final == "both" and adapter.image_grid_2d and not adapter.several_images_per_prompt:
            raise InputError(f"carve:final=both asks about two images in one prompt, which {adapter.family} cannot "
                             "tell apart: use carve:final=refined")
        view, mask = self.refine(ctx)
        ctx.state["carve"] = {"view": view, "mask": mask}
        return [ctx.image, view] if self.final == "both" else [view]
