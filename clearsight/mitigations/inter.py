"""INTER: Interaction Guidance Sampling (Dong et al., "Mitigating Hallucination in LVLMs by Interaction
Guidance Sampling", ICCV 2025, arXiv 2507.05056; code xxxxx313/INTER at 586f565a).

Two players, the image v and the prompt p (the generated prefix y<t is context, kept in every row).
Per step four rows run in the same batched forward, each with its own KV cache, all fed the chosen token:

    z_full = z(v, p),  z_noimg = z(noise, p),  z_noprompt = z(v, ""),  z_neither = z(noise, "")

The interaction of the two players (the Harsanyi dividend of the coalition {v, p}, per vocabulary entry):

    I = z_full - z_noimg - z_noprompt + z_neither

Gate ("Interactive Guided Locator"): D = Var_vocab(I) (unbiased, per row, as ``torch.var``); I := 0 when
D < k. Modifier: z' = z_full + I. Plausibility cut (VCD Eq. 4 on the full branch): tokens with
z_full < max z_full + ln beta become -inf. Defaults from the released code (the paper body was not read, see
``shared/reference/inter-carve.md``): k = 1.0 (``evolve_ours_sampling(k=1.0)``; the POPE script parses
``--var_k`` but never passes it), beta = 0.1 (hard-coded), weight 1 (not a parameter in the code).

The noised image: the processed (normalised) pixel tensor replaced by U[0, 1) noise of the same shape (the
released code's ``torch.rand_like(pixel_values)``), so the image keeps its token count and positions; it is
not VCD's diffusion noise and not a no-image row. Drawn from a generator seeded with ``seed`` (the same
noise in the two noised rows, and alone or in a batch).

"Remove the prompt" (``prompt_removal``): the released code calls InstructBLIP's processor with empty text
(image query tokens + BOS; InstructBLIP has no chat template). For chat-templated models:

- ``question`` (default): the chat template and its image slot are kept, the user's text is empty;
- ``template``: only the image slot and the template's generation suffix (the assistant marker), no user
  turn text or system text;
- ``all``: only the image slot (the tokenizer's BOS if it adds one), as the released code's empty-text call.

k = None (no gate: the interaction is never added) and beta = 0 (no cut) give exactly the unmitigated
tokens. Under greedy decoding the cut alone never changes the argmax, so k = None is enough there.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
from pydantic import Field

from clearsight.config import Seed
from clearsight.errors import InputError
from clearsight.mitigations._branch_common import cut, plausible, require_image
from clearsight.mitigations.base import MAIN, Branch, Mitigation, RequestContext
from clearsight.mitigations.registry import register

NOIMG = "noimg"
NOPROMPT = "noprompt"
NEITHER = "neither"
_SENTINEL = "qqqsentinelqqq"


def uniform_noise(pixels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """U[0, 1) noise of ``pixels``' shape and dtype (INTER's noised image in the normalised input space)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(pixels.shape, generator=gen, dtype=torch.float32).to(device=pixels.device, dtype=pixels.dtype)


def template_parts(adapter) -> tuple[str, str]:
    """(image slot, generation suffix) of the adapter's chat template, found by formatting a sentinel prompt
    with and without an image: the slot is what the image adds, the suffix what follows the user's text."""
    with_image = adapter.chat_prompt(_SENTINEL, has_image=True)
    without = adapter.chat_prompt(_SENTINEL, has_image=False)
    head = 0
    while head < min(len(with_image), len(without)) and with_image[head] == without[head]:
        head += 1
    tail = 0
    while tail < min(len(with_image), len(without)) - head and with_image[-1 - tail] == without[-1 - tail]:
        tail += 1
    slot = with_image[head:len(with_image) - tail]
    suffix = with_image[with_image.rindex(_SENTINEL) + len(_SENTINEL):]
    if not slot or _SENTINEL in slot:
        raise InputError(f"inter: prompt_removal needs the image slot of the chat template, and "
                         f"{adapter.family}'s prompt has none that can be found: use prompt_removal=question")
    return slot, suffix


def no_prompt_branch_text(adapter, removal: str) -> tuple[str, bool]:
    """(text, template) of the prompt-removed row for ``removal`` (see the module docstring)."""
    if removal == "question":
        return "", True
    slot, suffix = template_parts(adapter)
    return (slot + suffix if removal == "template" else slot), False


def interaction(full: torch.Tensor, noimg: torch.Tensor, noprompt: torch.Tensor, neither: torch.Tensor) -> torch.Tensor:
    """I = z_full - z_noimg - z_noprompt + z_neither (fp32), 0 where ``full`` is -inf (a token an earlier
    combiner removed stays removed and does not enter the variance)."""
    finite = torch.isfinite(full)
    i = full.float() - noimg.float() - noprompt.float() + neither.float()
    return torch.where(finite, i, torch.zeros_like(i))


def inter_logits(full: torch.Tensor, noimg: torch.Tensor, noprompt: torch.Tensor, neither: torch.Tensor,
                 k: float | None, beta: float) -> torch.Tensor:
    """INTER's step: z_full + I when Var_vocab(I) >= k (unbiased variance; k None = never), cut at beta on z_full."""
    finite = torch.isfinite(full)
    out = full.float()
    if k is not None:
        inter = interaction(full, noimg, noprompt, neither)
        if float(inter[finite].var()) >= k:
            out = torch.where(finite, out + inter, out)
    return cut(out, plausible(full, beta))


@register
class INTER(Mitigation):
    name: Literal["inter"] = "inter"
    summary = ("INTER (Dong et al. 2025): add the image-prompt interaction z-z_noimg-z_noprompt+z_neither when its "
               "variance >= k, cut at beta")
    kind = "branch"

    k: float | None = Field(1.0, ge=0.0, description="variance gate: add the interaction when Var_vocab(I) >= k "
                            "(logit^2 units; 0 = always, none = never, i.e. k = infinity)")
    beta: float = Field(0.1, ge=0.0, le=1.0, description="plausibility cut on the full logits: keep p >= beta*max p "
                        "(0 = off)")
    prompt_removal: Literal["question", "template", "all"] = Field(
        "question", description="the prompt-removed rows: question (template kept, user text empty), template "
        "(image slot + assistant marker only), all (image slot only, as the released code)")
    seed: Seed = Field(0, description="seed of the U[0,1) noise that replaces the processed image")

    def branches(self, ctx: RequestContext) -> list[Branch]:
        require_image(ctx, "inter", "its players are the image and the prompt")
        noise = functools.partial(uniform_noise, seed=self.seed)
        text, template = no_prompt_branch_text(ctx.lvlm.adapter, self.prompt_removal)
        return [Branch(NOIMG, pixel_transform=noise),
                Branch(NOPROMPT, prompt=text, template=template),
                Branch(NEITHER, prompt=text, template=template, pixel_transform=noise)]

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        return inter_logits(logits[MAIN], logits[NOIMG], logits[NOPROMPT], logits[NEITHER], self.k, self.beta)
