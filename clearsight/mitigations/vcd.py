"""VCD: Visual Contrastive Decoding (Leng et al., "Mitigating Object Hallucinations in Large
Vision-Language Models through Visual Contrastive Decoding", CVPR 2024; code DAMO-NLP-SG/VCD).

A branch row sees the same prompt with a distorted image: forward diffusion (Ho et al. 2020, Eq. 4)
of the *processed* (normalised) pixel tensor,
``x_T = sqrt(abar_T) x_0 + sqrt(1 - abar_T) eps``, ``eps ~ N(0, I)``, at step T = 500 of 1000
(VCD Sec. 4.1, Eq. 2). Per step (VCD Eq. 3 and 4):

    l = (1 + alpha) * l(y | v, x) - alpha * l(y | v', x),   alpha = 1,
    restricted to tokens with p(y | v, x) >= beta * max p,  beta = 0.1 (the eval .py; the bash script uses 0.2).

Noise schedule: ``sigmoid`` (default) is the released code's ``sigmoid(linspace(-6, 6, 1000)) *
(5e-3 - 1e-5) + 1e-5``; ``linear`` is DDPM's ``linspace(1e-4, 0.02, 1000)``. At T = 500 the signal
kept is sqrt(abar) = 0.47 (sigmoid) or 0.28 (linear). The noise is drawn from a ``torch.Generator``
seeded with ``seed``, so a request gives the same noised pixels every time, alone or in a batch.

The branch keeps its own KV cache rows for the whole generation (it is a row of the batch).
alpha = 0 keeps the branch and applies only the cut, which never removes the greedy token.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field

from clearsight.config import Seed
from clearsight.mitigations._branch_common import contrast, cut, plausible, require_image
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.registry import register

NOISED = "noised"
NUM_STEPS = 1000


@functools.lru_cache(maxsize=4)
def alpha_bar(schedule: str, num_steps: int = NUM_STEPS) -> torch.Tensor:
    """Cumulative products abar_t = prod_{s<=t} (1 - beta_s), t = 0..num_steps-1 (float64)."""
    if schedule == "sigmoid":  # VCD's vcd_add_noise.py
        betas = torch.sigmoid(torch.linspace(-6, 6, num_steps, dtype=torch.float64)) * (0.5e-2 - 1e-5) + 1e-5
    elif schedule == "linear":  # DDPM (Ho et al. 2020, Sec. 4)
        betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    else:
        raise ValueError(f"unknown noise schedule '{schedule}'")
    return torch.cumprod(1.0 - betas, 0)


def diffuse(pixels: torch.Tensor, step: int, schedule: str = "sigmoid", seed: int = 0) -> torch.Tensor:
    """q(x_t | x_0) sample: sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps, eps from a generator seeded by ``seed``."""
    ab = alpha_bar(schedule)[step]
    gen = torch.Generator().manual_seed(seed)
    eps = torch.randn(pixels.shape, generator=gen, dtype=torch.float32).to(pixels.device)
    out = ab.sqrt().item() * pixels.float() + (1.0 - ab).sqrt().item() * eps
    return out.to(pixels.dtype)


def vcd_logits(main: torch.Tensor, noised: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """VCD Eq. 3 + 4: (1 + alpha) l - alpha l_noise on the tokens with p_main >= beta * max p_main."""
    return cut(contrast(main, noised, alpha), plausible(main, beta))


@register
class VCD(Mitigation):
    name: Literal["vcd"] = "vcd"
    summary = "VCD (Leng et al. 2024): contrast with a diffusion-noised image, (1+alpha) l - alpha l_noise"
    kind = "branch"

    alpha: float = Field(1.0, ge=0.0, description="contrast weight: (1+alpha) l - alpha l_noise")
    beta: float = Field(0.1, ge=0.0, le=1.0, description="plausibility cut: keep p >= beta * max p (0 = off)")
    noise_step: int = Field(500, ge=0, lt=NUM_STEPS, description="forward-diffusion step of the noised image (of 1000)")
    schedule: Literal["sigmoid", "linear"] = Field(
        "sigmoid", description="beta schedule: sigmoid (VCD's code, 1e-5..5e-3) or linear (DDPM, 1e-4..0.02)")
    seed: Seed = Field(0, description="seed of the diffusion noise")

    def branches(self, ctx: RequestContext) -> list[Branch]:
        require_image(ctx, "vcd", "its branch is the noised image")
        return [Branch(NOISED, pixel_transform=functools.partial(
            diffuse, step=self.noise_step, schedule=self.schedule, seed=self.seed))]

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        return vcd_logits(logits[MAIN], logits[NOISED], self.alpha, self.beta)
