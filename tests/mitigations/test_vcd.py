"""VCD: noise schedule and q(x_t|x_0), Eq. 3 + cut by hand, branch = noised row alone, zero weight,
greedy and seeded sampling, mixed batches, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from test_branch_common import forced_logits, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.decoding.sampling import select_token
from clearsight.errors import InputError
from clearsight.mitigations import parse_mitigation
from clearsight.mitigations.vcd import VCD, alpha_bar, diffuse, vcd_logits

PROMPT = "what is in the picture?"
DECODE = DecodeSpec(max_new_tokens=5, ignore_eos=True)


class RecVCD(VCD):
    """VCD that records the logits it combines."""

    def combine(self, logits, step, ctx):
        LOG.append((logits["main"].clone(), logits["noised"].clone()))
        return super().combine(logits, step, ctx)


LOG: list[tuple[torch.Tensor, torch.Tensor]] = []


@pytest.fixture(autouse=True)
def _clear():
    LOG.clear()


def test_schedules_by_hand():
    # sigmoid: VCD's betas = sigmoid(linspace(-6, 6, 1000)) * (5e-3 - 1e-5) + 1e-5
    prod = 1.0
    for i in range(501):
        x = -6 + 12 * i / 999
        prod *= 1 - (1 / (1 + math.exp(-x)) * (0.5e-2 - 1e-5) + 1e-5)
    assert abs(float(alpha_bar("sigmoid")[500]) - prod) < 1e-9
    prod = 1.0
    for i in range(501):
        prod *= 1 - (1e-4 + (0.02 - 1e-4) * i / 999)
    assert abs(float(alpha_bar("linear")[500]) - prod) < 1e-9


def test_diffusion_is_q_sample_and_seeded():
    x = torch.randn(1, 3, 8, 8)
    ab = float(alpha_bar("sigmoid")[500])
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    want = math.sqrt(ab) * x + math.sqrt(1 - ab) * eps
    torch.testing.assert_close(diffuse(x, 500, "sigmoid", 7), want)
    torch.testing.assert_close(diffuse(x, 500, "sigmoid", 7), diffuse(x, 500, "sigmoid", 7))
    assert not torch.equal(diffuse(x, 500, "sigmoid", 7), diffuse(x, 500, "sigmoid", 8))
    torch.testing.assert_close(diffuse(x, 0, "linear", 1), math.sqrt(1 - 1e-4) * x + 0.01 * torch.randn(
        x.shape, generator=torch.Generator().manual_seed(1)))


def test_formula_and_cut_by_hand():
    main = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    noised = torch.tensor([1.0, 0.0, -1.0, 5.0])
    got = vcd_logits(main, noised, alpha=1.0, beta=0.6)
    want = 2 * main - noised
    want[2:] = float("-inf")  # p = 0.2, 0.1 < 0.6 * 0.4
    torch.testing.assert_close(got, want)
    got = vcd_logits(main, noised, alpha=0.5, beta=0.1)  # all four kept (0.1 >= 0.04)
    torch.testing.assert_close(got, 1.5 * main - 0.5 * noised)


def test_defaults_and_cli_parsing():
    m = parse_mitigation("vcd:alpha=1")
    assert (m.alpha, m.beta, m.noise_step, m.schedule) == (1.0, 0.1, 500, "sigmoid")
    assert parse_mitigation("vcd:noise_step=999,schedule=linear").noise_step == 999
    with pytest.raises(InputError):
        parse_mitigation("vcd:noise_step=1000")


def test_branch_is_the_noised_row_alone_and_drives_greedy_tokens():
    lvlm = tiny("tiny-llava")
    img = make_image(1)
    spec = RecVCD(alpha=1.5, beta=0.1, seed=3)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}], [spec], decode=DECODE)[0]
    mains = torch.stack([m for m, _ in LOG])
    noised = torch.stack([n for _, n in LOG])
    noise = functools.partial(diffuse, step=500, schedule="sigmoid", seed=3)
    torch.testing.assert_close(noised, forced_logits(lvlm, PROMPT, img, out.token_ids, noise), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(mains, forced_logits(lvlm, PROMPT, img, out.token_ids), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(mains, noised, atol=1e-3)  # the noise changed the branch
    chosen = []
    for m, n in LOG:  # Eq. 3 + 4 by hand
        p = torch.softmax(m, -1)
        c = 2.5 * m - 1.5 * n
        c[p < 0.1 * p.max()] = float("-inf")
        chosen.append(int(c.argmax()))
    assert chosen == out.token_ids


def test_seeded_sampling_follows_the_combined_distribution():
    lvlm = tiny("tiny-llava")
    img = make_image(2)
    decode = DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=5)
    out = generate(lvlm, [{"prompt": PROMPT, "image": img}], [RecVCD(beta=0.0)], decode=decode)[0]
    gen = torch.Generator().manual_seed(5)
    chosen = [select_token(2 * m - n, decode, gen) for m, n in LOG]
    assert chosen == out.token_ids
    again = generate(lvlm, [{"prompt": PROMPT, "image": img}], ["vcd:beta=0"], decode=decode)[0]
    assert again.token_ids == out.token_ids


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_zero_weight_is_unmitigated(family):
    lvlm = tiny(family)
    req = {"prompt": PROMPT, "image": make_image(3)}
    base = generate(lvlm, [req], decode=DECODE)[0].token_ids
    assert generate(lvlm, [req], ["vcd:alpha=0"], decode=DECODE)[0].token_ids == base  # cut keeps the argmax
    sampled = DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=2)
    base = generate(lvlm, [req], decode=sampled)[0].token_ids
    assert generate(lvlm, [req], ["vcd:alpha=0,beta=0"], decode=sampled)[0].token_ids == base


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-llava-next")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["vcd"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "is there a red circle?", "image": make_image(6), "mitigations": ["vcd:alpha=3,seed=1"]},
        {"prompt": "what color is it", "mitigations": []},
    ]
    for decode in (DECODE, DecodeSpec(max_new_tokens=5, ignore_eos=True, do_sample=True, seed=4)):
        batched = [r.token_ids for r in generate(lvlm, reqs, decode=decode)]
        solo = [generate(lvlm, [r], decode=decode)[0].token_ids for r in reqs]
        assert batched == solo


def test_text_only_request_fails_clearly():
    lvlm = tiny("tiny-llava")
    with pytest.raises(InputError, match="vcd needs an image"):
        generate(lvlm, [{"prompt": PROMPT}], ["vcd"], decode=DECODE)
