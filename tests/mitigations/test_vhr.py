"""VHR: selection vs a plain-torch VHD (Eq. 3-6), layer-by-layer reinforcement, decode head scaling."""

from __future__ import annotations

import pytest
import torch
from mithelp import FAMILIES, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.vhr import VHR, select_heads, vhr_layers

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=4, ignore_eos=True)


def _plain_select(a_img, a_txt, alpha):
    """VHR by the paper, written out: [H, D] head outputs at the first generated position."""
    H = a_img.shape[0]
    vhd = [float(torch.linalg.vector_norm(a_img[h].double() - a_txt[h].double())) for h in range(H)]
    ta = [float(a_txt[h].double().pow(2).sum()) for h in range(H)]
    mu, sd = sum(vhd) / H, (sum((v - sum(vhd) / H) ** 2 for v in vhd) / H) ** 0.5
    mu_t, sd_t = sum(ta) / H, (sum((t - sum(ta) / H) ** 2 for t in ta) / H) ** 0.5
    vhd = [0.0 if (v > mu + sd and t > mu_t + sd_t) else v for v, t in zip(vhd, ta)]
    srt = sorted(vhd)
    med = (srt[H // 2 - 1] + srt[H // 2]) / 2 if H % 2 == 0 else srt[H // 2]
    return [alpha if v > med else 1.0 for v in vhd]


def _record(lvlm):
    """Head outputs [B, L, H, D] before o_proj of every layer and forward (what the model really computed)."""
    rec: list[dict[int, torch.Tensor]] = []

    def fn(layer, x):
        if layer == 0:
            rec.append({})
        rec[-1][layer] = x.detach().clone()

    # registered after the mitigation's hook? no: before generate, so it sees the *input* of VHR's hook
    return rec, lvlm.adapter.hook_head_outputs(fn)


@pytest.mark.parametrize("family", FAMILIES)
def test_selection_and_reinforcement_match_plain_torch(family):
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(1)}
    rec, h = _record(lvlm)
    ctxs = []

    class Keep(VHR):
        def install(self, ctx):
            ctxs.append((ctx, dict(ctx.rows)))  # the rows of the prefill (the no-image row leaves after it)
            return super().install(ctx)

    try:
        out = generate(lvlm, [req], [Keep(alpha=3.0)], decode=DECODE)[0]
    finally:
        h.remove()
    ctx, prefill_rows = ctxs[0]
    main, noimg = prefill_rows["main"], prefill_rows["vhr.noimg"]
    layers = vhr_layers(None, 4)
    assert layers == [1, 2, 3]
    prefill = rec[0]
    for layer in layers:
        want = _plain_select(prefill[layer][main, -1], prefill[layer][noimg, -1], 3.0)
        assert ctx.state["vhr"][layer]["scale"].tolist() == want
    # decode: the plan scales the fixed heads; the recorded input of the hook is before scaling,
    # so the head outputs handed to o_proj are the recorded ones times the scale (checked via o_proj)
    assert len(rec) == DECODE.max_new_tokens and len(out.token_ids) == DECODE.max_new_tokens
    edit = ctx.plan.layer_edit(layers[0])
    assert "vhr.noimg" not in ctx.rows and edit is not None and edit.head_scale.shape[0] == 1  # branch left
    assert edit.head_scale[ctx.rows["main"]].tolist() == ctx.state["vhr"][layers[0]]["scale"].tolist()


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_generation_equals_a_hand_written_vhr(family):
    """An independent VHR: a plain hook on the unmitigated model, the no-image prompt as a second request."""
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(2)}
    chosen: dict[int, list[float]] = {}

    def by_hand(layer, x):
        if layer not in (1, 2, 3):
            return None
        if x.shape[1] > 1:  # prefill: measure at the last position, reinforce, then go on to the next layer
            chosen[layer] = _plain_select(x[0, -1], x[1, -1], 2.0)
        out = x.clone()
        out[0] = out[0] * torch.tensor(chosen[layer], dtype=x.dtype).view(1, -1, 1)
        return out

    with lvlm.adapter.hook_head_outputs(by_hand):
        want = generate(lvlm, [req, {"prompt": PROMPT}], decode=DECODE)[0].token_ids
    ctxs = []

    class Keep(VHR):
        def install(self, ctx):
            ctxs.append(ctx)
            return super().install(ctx)

    got = generate(lvlm, [req], [Keep()], decode=DECODE)[0].token_ids
    assert {k: v["scale"].tolist() for k, v in ctxs[0].state["vhr"].items()} == chosen
    assert got == want
    assert got != generate(lvlm, [req], decode=DECODE)[0].token_ids or family == "tiny-qwen2-vl"


def test_probe_equals_branch():
    lvlm = tiny("tiny-llava-next")
    req = {"prompt": PROMPT, "image": make_image(3)}
    a = generate(lvlm, [req], ["vhr:alpha=2.5"], decode=DECODE)[0].token_ids
    b = generate(lvlm, [req], ["vhr:alpha=2.5,text_pass=probe"], decode=DECODE)[0].token_ids
    assert a == b


def test_zero_strength_mixed_batch():
    lvlm = tiny("tiny-qwen2-vl")
    req = {"prompt": PROMPT, "image": make_image(4)}
    assert generate(lvlm, [req], ["vhr:alpha=1"], decode=DECODE)[0].token_ids == \
        generate(lvlm, [req], decode=DECODE)[0].token_ids
    lvlm = tiny("tiny-llava")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["vhr:alpha=3"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(6), "mitigations": ["vhr:text_pass=probe"]},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    assert batched == [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]


def test_outlier_std_population_or_sample_by_hand():
    # VHD = [1, 2, 3, 3.45], TA = [0, 0, 0, 10]. Head 3's VHD: mean 2.3625; population std 0.9456 -> threshold
    # 3.308 < 3.45 (a surge, with TA 10 > 2.5 + 4.33): zeroed, heads 1, 2 above the median 1.5; sample std
    # 1.0919 -> threshold 3.454 > 3.45: kept, heads 2, 3 above the median 2.5.
    without = torch.tensor([[0.0], [0.0], [0.0], [10 ** 0.5]])
    with_image = without + torch.tensor([[1.0], [2.0], [3.0], [3.45]])
    vhd, scale = select_heads(with_image, without, 2.0, True, "population")
    assert vhd[3] == 0 and scale.tolist() == [1.0, 2.0, 2.0, 1.0]
    vhd, scale = select_heads(with_image, without, 2.0, True, "sample")
    assert abs(float(vhd[3]) - 3.45) < 1e-5 and scale.tolist() == [1.0, 1.0, 2.0, 2.0]
    assert parse_mitigation("vhr").outlier_std == "population"
