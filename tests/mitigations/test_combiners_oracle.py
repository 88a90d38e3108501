"""The branch methods' per-step combiners through their ``combine`` / ``branches`` entry points, against
plain-Python formulas (VCD, Leng et al. 2024, Eq. 3-4; M3ID, Favero et al. 2024, Eq. 7 with
g_t = exp(-lambda t)); no model is loaded."""

from __future__ import annotations

import math

import pytest
import torch

from clearsight.errors import InputError
from clearsight.mitigations import MAIN, RequestContext, parse_mitigation
from clearsight.mitigations.m3id import MAX_EXPONENT, m3id_weight

NEG = float("-inf")


def _ctx(image="scene.png") -> RequestContext:
    return RequestContext(lvlm=None, request=None, index=3, rows={"main": 0}, layouts=[], plan=None,  # type: ignore[arg-type]
                          decode=None, image=image)  # type: ignore[arg-type]


def _probs(logits: list[float]) -> list[float]:
    top = max(x for x in logits if x != NEG)
    w = [math.exp(x - top) if x != NEG else 0.0 for x in logits]
    return [x / sum(w) for x in w]


MAIN_L = [2.0, 1.2, 0.1, -1.5, NEG, 0.9]
OTHER_L = [0.5, 2.5, -0.3, 1.0, 3.0, -2.0]


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 0.1), (2.5, 0.3), (0.0, 0.0), (0.7, 1.0)])
def test_vcd_combine_is_the_contrast_on_the_plausible_tokens(alpha, beta):
    m = parse_mitigation({"name": "vcd", "alpha": alpha, "beta": beta})
    got = m.combine({MAIN: torch.tensor(MAIN_L), "noised": torch.tensor(OTHER_L)}, 4, _ctx())
    p = _probs(MAIN_L)
    for i, (lm, lo) in enumerate(zip(MAIN_L, OTHER_L)):
        kept = lm != NEG and (beta <= 0 or p[i] >= beta * max(p))
        want = (1 + alpha) * lm - alpha * lo if kept else NEG
        assert float(got[i]) == pytest.approx(want, abs=1e-5), i
    assert got.dtype == torch.float32


def test_vcd_branch_is_the_diffused_image():
    m = parse_mitigation("vcd:noise_step=300,schedule=linear,seed=9")
    [br] = m.branches(_ctx())
    assert br.name == "noised" and br.image == "same" and br.until_step is None and br.receives_edits
    x = torch.rand(1, 3, 4, 4)
    ab = 1.0
    for i in range(301):  # DDPM linear betas 1e-4 .. 0.02 over 1000 steps, abar_300
        ab *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(br.pixel_transform(x), math.sqrt(ab) * x + math.sqrt(1 - ab) * eps)
    with pytest.raises(InputError) as err:
        m.branches(_ctx(image=None))
    assert str(err.value) == ("vcd needs an image (its branch is the noised image); request 3 has none: "
                              "drop vcd for text-only requests")


@pytest.mark.parametrize(("lam", "threshold", "max_weight", "step"),
                         [(0.02, 0.9, None, 0), (0.1, 0.9, None, 9), (0.1, 0.99, 0.5, 20), (0.02, 0.3, None, 5)])
def test_m3id_combine_gated_weighted_contrast(lam, threshold, max_weight, step):
    m = parse_mitigation({"name": "m3id", "lam": lam, "threshold": threshold, "max_weight": max_weight})
    main = [1.0, 0.2, -0.5, 0.9]
    noimg = [0.1, 1.5, 0.0, -1.0]
    got = m.combine({MAIN: torch.tensor(main), "noimg": torch.tensor(noimg)}, step, _ctx())
    t = step + 1  # the first generated token is t = 1
    w = math.exp(lam * t) - 1
    if max_weight is not None:
        w = min(w, max_weight)
    gated = max(_probs(main)) >= threshold
    want = main if gated else [a + w * (a - b) for a, b in zip(main, noimg)]
    assert got.tolist() == pytest.approx(want, abs=1e-5)
    assert gated == (threshold == 0.3)  # both sides of the gate are exercised


def test_m3id_branch_and_weight_saturation():
    m = parse_mitigation("m3id")
    [br] = m.branches(_ctx())
    assert br.name == "noimg" and br.image is None and br.prompt is None and br.until_step is None
    with pytest.raises(InputError) as err:
        m.branches(_ctx(image=None))
    assert str(err.value) == ("m3id needs an image (its branch is the same prompt without the image); request 3 "
                              "has none: drop m3id for text-only requests")
    # lam t is saturated at MAX_EXPONENT = 30 (exp(30) - 1 fits float32 logits' range; exp(710) overflows)
    assert MAX_EXPONENT == 30.0
    assert m3id_weight(10_000, 1.0) == pytest.approx(math.expm1(30.0))
    assert m3id_weight(29, 1.0) == pytest.approx(math.expm1(29.0))
    assert m3id_weight(10_000, 1.0, max_weight=3.0) == 3.0
    assert m3id_weight(2, 0.1, max_weight=3.0) == pytest.approx(math.expm1(0.2))


def test_diffuse_defaults_and_dtype():
    from clearsight.mitigations.vcd import diffuse

    x = torch.rand(1, 3, 4, 4)
    # the defaults are VCD's: the sigmoid schedule and noise seed 0
    torch.testing.assert_close(diffuse(x, 500), diffuse(x, 500, "sigmoid", 0))
    assert not torch.equal(diffuse(x, 500), diffuse(x, 500, "linear", 0))
    assert not torch.equal(diffuse(x, 500), diffuse(x, 500, "sigmoid", 1))
    half = diffuse(x.to(torch.bfloat16), 500)  # a half-precision model's pixels stay in its dtype
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), diffuse(x.to(torch.bfloat16).float(), 500), atol=2e-2, rtol=0)


def test_m3id_gate_at_the_threshold_keeps_the_main_logits():
    """The gate is ``max p_c >= threshold``: two equal logits give max p = 0.5 exactly."""
    m = parse_mitigation({"name": "m3id", "lam": 0.5, "threshold": 0.5})
    main, noimg = torch.tensor([0.0, 0.0]), torch.tensor([1.0, -1.0])
    assert torch.equal(m.combine({MAIN: main, "noimg": noimg}, 3, _ctx()), main)
