"""AGLA's image-prompt matchers and the augmented (locally masked) view.

A ``Matcher`` maps (image, prompt) to a relevance map over the image and an image-text similarity
in [0, 1]. AGLA (An et al., CVPR 2025, Sec. 3.2) uses GradCAM of BLIP's image-text-matching head
and BLIP's ITC cosine; here:

- ``attention`` (default, no extra model): the LVLM's own attention from the last prompt row (the
  row that predicts the first answer token) to the image tokens, averaged over heads and the
  chosen layers (default: the middle half), read from the plan's ``last_row`` statistics of one
  unmitigated prefill (run through the request's probe, ``RequestContext.probe``). The similarity is
  that row's attention mass on the image keys.
- ``clip``: a ``transformers`` CLIP model from a local folder (``clip_path``): the relevance of each
  patch is the cosine between its projected token and the projected text (MaskCLIP-style dense
  features, no gradients), the similarity is the CLIP image-text cosine (AGLA's ITC).

Other matchers can be added with ``register_matcher(name, factory)``.

``augmented_view``: AGLA's mask (code, ``augmentation``): the map is bicubically upsampled to the
covered image region, Gaussian-smoothed (sigma = 0.02 x the longer side), min-max normalised, and
the pixels below the value at rank ``N * (1 - ratio)`` of the descending order are blacked out.
The masked fraction is ``ratio = similarity / 2`` unless fixed (AGLA: 1 - keep = itc / 2).
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clearsight.errors import InputError
from clearsight.mitigations.base import Probe, RequestContext, probe_for
from clearsight.mitigations.pai import boost_layers
from clearsight.models.adapters import center_crop_box

Box = tuple[int, int, int, int]  # left, top, right, bottom in image pixels


@dataclass
class Match:
    relevance: torch.Tensor  # [h, w] over ``box`` (higher = more relevant to the prompt)
    similarity: float  # image-text similarity in [0, 1]
    box: Box | None = None  # the image region the map covers (None = the whole image)


class Matcher(ABC):
    """Image-prompt matching: where in the image the prompt looks, and how well image and prompt match.

    A matcher that runs the LVLM takes a keyword ``probe`` (``clearsight.mitigations.Probe``, None = the
    model's default probe): AGLA passes the request's own (``RequestContext.probe``) to a matcher whose
    ``match`` accepts it (``match_for``); a matcher without the keyword is called as before.
    """

    @abstractmethod
    def match(self, lvlm: Any, image: Image.Image, prompt: str) -> Match: ...


def match_for(matcher: Matcher, ctx: RequestContext) -> Match:
    """``matcher.match`` on the request's model, image and prompt, with the request's probe when it takes one."""
    kwargs: dict[str, Any] = {}
    try:
        if "probe" in inspect.signature(matcher.match).parameters:
            kwargs["probe"] = ctx.probe
    except (TypeError, ValueError):  # no signature (a builtin or C callable): call it without the probe
        pass
    assert ctx.image is not None
    return matcher.match(ctx.lvlm, ctx.image, ctx.request.prompt, **kwargs)


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a [H, W] map (replicate borders, radius 3 sigma)."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    y = F.pad(x[None, None], (r, r, r, r), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y[0, 0]


def relevance_mask(relevance: torch.Tensor, size: tuple[int, int], ratio: float, sigma: float = 0.02) -> torch.Tensor:
    """Bool [H, W] (size = (W, H)): True where a pixel is blacked out (the ``ratio`` least relevant ones)."""
    W, H = size
    m = F.interpolate(relevance.float()[None, None], size=(H, W), mode="bicubic", align_corners=False)[0, 0]
    m = gaussian_blur(m, sigma * max(H, W))
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-12)
    n = H * W
    drop = min(max(int(round(n * ratio)), 0), n)
    if drop == 0:
        return torch.zeros(H, W, dtype=torch.bool)
    # AGLA: black out the pixels below the value at rank N * keep of the descending order; ties at that
    # value are broken by position (row-major), so exactly round(N * ratio) pixels go black
    order = torch.argsort(m.flatten(), stable=True)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[order[:drop]] = True
    return mask.view(H, W)


def augmented_view(image: Image.Image, match: Match, ratio: float, sigma: float = 0.02) -> Image.Image:
    """The image with the low-relevance pixels of ``match.box`` blacked out (pixels outside the box kept)."""
    left, top, right, bottom = match.box or (0, 0, *image.size)
    mask = relevance_mask(match.relevance, (right - left, bottom - top), ratio, sigma).numpy()
    arr = np.array(image.convert("RGB"))
    region = arr[top:bottom, left:right]
    region[mask] = 0
    arr[top:bottom, left:right] = region
    return Image.fromarray(arr)


class AttentionMatcher(Matcher):
    """The LVLM's own last-prompt-row attention over the image tokens (one unmitigated prefill)."""

    def __init__(self, layers: list[int] | None = None) -> None:
        self.layers = layers

    def match(self, lvlm: Any, image: Image.Image, prompt: str, probe: Probe | None = None) -> Match:
        from clearsight.config import DecodeSpec
        from clearsight.kernels.plan import StatsRequest

        if not lvlm.adapter.image_grid_2d:
            raise InputError(f"agla's attention matcher is not supported for {lvlm.adapter.family}: it reads attention "
                             "over a 2-D grid of image tokens, and this family's are learned queries; give clip_path "
                             "(the clip matcher)")
        L = lvlm.adapter.num_layers
        layers = (boost_layers(self.layers, L) if self.layers is not None
                  else list(range(L // 4, max(3 * L // 4, L // 4 + 1))))
        res = probe_for(lvlm, probe)([{"prompt": prompt, "image": image}], decode=DecodeSpec(max_new_tokens=1),
                                     stats=StatsRequest(last_row=True, layers=frozenset(layers)), batched=True)[0]
        if not res.stats or not res.stats.get("last_row"):
            raise InputError(f"agla's attention matcher needs attention statistics, which the '{lvlm.backend}' "
                             "backend does not record: use the torch or reference backend")
        layout = res.stats["layout"]
        pad = layout.pad
        rows = torch.stack([res.stats["last_row"][layer][0] for layer in layers]).float()  # [layers, H, Lk]
        att = rows.mean((0, 1))  # [Lk] (padding removed)
        (gr, gc) = layout.grids[0]
        start = lvlm.adapter.grid_start(layout.image_spans[0], (gr, gc))  # LLaVA-NeXT: the base grid; InternVL: last
        base = att[start - pad: start - pad + gr * gc]
        mass = sum(float(att[s - pad: e - pad].sum()) for s, e in layout.image_spans)
        box = center_crop_box(lvlm.processor.image_processor, image) if lvlm.adapter.center_crop_preprocess else None
        return Match(relevance=base.view(gr, gc), similarity=min(max(mass, 0.0), 1.0), box=box)


_CLIP_CACHE: dict[str, tuple[Any, Any, Any]] = {}


class ClipMatcher(Matcher):
    """A local ``transformers`` CLIP: dense patch-text cosines as relevance, image-text cosine as similarity."""

    def __init__(self, path: str) -> None:
        self.path = path

    def _load(self) -> tuple[Any, Any, Any]:
        if self.path not in _CLIP_CACHE:
            from pathlib import Path

            from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

            if not Path(self.path).expanduser().is_dir():
                raise InputError(f"agla clip_path '{self.path}' is not a folder with a CLIP model")
            model = CLIPModel.from_pretrained(self.path).eval()
            _CLIP_CACHE[self.path] = (model, AutoTokenizer.from_pretrained(self.path),
                                      AutoImageProcessor.from_pretrained(self.path))
        return _CLIP_CACHE[self.path]

    def match(self, lvlm: Any, image: Image.Image, prompt: str) -> Match:
        model, tok, ip = self._load()
        pixels = ip(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"]
        text = tok([prompt], return_tensors="pt", truncation=True, max_length=77, padding=True)
        with torch.no_grad():
            vis = model.vision_model(pixel_values=pixels.to(model.dtype))
            txt = model.text_model(input_ids=text["input_ids"], attention_mask=text.get("attention_mask"))
            t = F.normalize(model.text_projection(txt.pooler_output).float(), dim=-1)[0]
            img = F.normalize(model.visual_projection(vis.pooler_output).float(), dim=-1)[0]
            patches = model.vision_model.post_layernorm(vis.last_hidden_state[0, 1:])
            p = F.normalize(model.visual_projection(patches).float(), dim=-1)
        side = int(round(math.sqrt(p.shape[0])))
        return Match(relevance=(p @ t).view(side, side), similarity=min(max(float(img @ t), 0.0), 1.0),
                     box=center_crop_box(ip, image))


MATCHERS: dict[str, Callable[..., Matcher]] = {
    "attention": lambda spec: AttentionMatcher(spec.matcher_layers),
    "clip": lambda spec: ClipMatcher(spec.clip_path),
}


def register_matcher(name: str, factory: Callable[..., Matcher]) -> None:
    """Add a matcher: ``factory(agla_spec) -> Matcher``; selected with ``agla:matcher=name``."""
    MATCHERS[name] = factory
