"""Sampling and per-request seeds against independent oracles, and tests of these tests (issue 22).

The oracle of ``select_token`` is the textbook definition, written here in plain float64 Python and not
with the project's code: p_i = exp(l_i / T) / sum_j exp(l_j / T) (softmax with temperature; Ackley et al.
1985, as in Holtzman et al. 2020, eq. 2), then nucleus (top-p) filtering (Holtzman et al. 2020, eq. 3): the
smallest set of most probable tokens whose mass reaches p, renormalised. Observed token shares at a fixed
seed budget are compared with a chi-square goodness-of-fit test; with fixed seeds the test is deterministic.

Each ``check_*`` function raises AssertionError when the code is wrong. The oracle tests call them on the
real code; the tests of the tests plant a plausible one-line bug (``plant.plant``) and expect a failure.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from plant import plant
from scipy.stats import chisquare
from tinyworld import make_image, tiny

import clearsight.decoding.batch as batch_mod
import clearsight.decoding.sampling as sampling
from clearsight import DecodeSpec, generate
from clearsight.decoding.batch import Entry

DRAWS = 3000
LOGITS = [2.0, 1.0, 0.5, 0.0, -1.0, -0.2]
NEG = float("-inf")
# (logits, temperature, top_p): well-posed cases (no near-tie at the nucleus boundary, checked below)
CASES = [
    (LOGITS, 0.8, 1.0),
    (LOGITS, 2.0, 1.0),
    (LOGITS, 1.3, 0.8),
    (LOGITS, 0.7, 0.9),
    ([1.0, NEG, 0.3, 0.9, NEG, -0.5], 1.5, 0.9),  # -inf: tokens a plausibility cut removed
]


def oracle(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """Token probabilities after temperature and top-p (float64, plain Python)."""
    finite = [x for x in logits if x != NEG]
    top = max(finite)
    w = [math.exp((x - top) / temperature) if x != NEG else 0.0 for x in logits]
    p = [x / sum(w) for x in w]
    if top_p >= 1.0:
        return p
    order = sorted(range(len(p)), key=lambda i: -p[i])
    kept, mass = [], 0.0
    for i in order:
        kept.append(i)
        mass += p[i]
        if mass >= top_p:
            break
    # the case must not sit on a tie at the boundary, where float32 rounding could decide either way
    assert abs(mass - top_p) > 1e-3 and abs(mass - p[kept[-1]] - top_p) > 1e-3
    z = sum(p[i] for i in kept)
    return [p[i] / z if i in kept else 0.0 for i in range(len(p))]


def draw(logits: list[float], decode: DecodeSpec, n: int = DRAWS, seed: int = 1234) -> Counter[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(logits, dtype=torch.float32)
    return Counter(sampling.select_token(x, decode, g) for _ in range(n))


def check_sampling_distribution(logits: list[float], temperature: float, top_p: float) -> None:
    """Exact support and chi-square fit of the observed shares (p > 0.001) at a fixed seed budget."""
    expected = oracle(logits, temperature, top_p)
    counts = draw(logits, DecodeSpec(do_sample=True, temperature=temperature, top_p=top_p))
    support = {i for i, p in enumerate(expected) if p > 0}
    assert set(counts) == support, f"sampled tokens {sorted(counts)} != nucleus {sorted(support)}"
    idx = sorted(support)
    observed = [counts[i] for i in idx]
    if len(idx) == 1:
        return
    fit = chisquare(observed, [expected[i] * DRAWS for i in idx])
    assert fit.pvalue > 1e-3, f"token shares {observed} do not fit {[round(expected[i], 3) for i in idx]}"


@pytest.mark.parametrize(("logits", "temperature", "top_p"), CASES)
def test_sampling_matches_the_textbook_distribution(logits, temperature, top_p):
    check_sampling_distribution(logits, temperature, top_p)


def test_oracle_cases_are_not_vacuous():
    """The cases distinguish T from 1/T and cut tokens, and every kept token is frequent enough to be seen."""
    for logits, t, top_p in CASES:
        p = oracle(logits, t, top_p)
        assert min(x for x in p if x > 0) * DRAWS > 20
        if t != 1.0:
            assert max(abs(a - b) for a, b in zip(p, oracle(logits, 1 / t, top_p))) > 0.05
    assert sum(x == 0 for x in oracle(*CASES[2])) == 2 and sum(x == 0 for x in oracle(*CASES[3])) == 3


def check_greedy(logits: list[float]) -> None:
    """Greedy is argmax whatever the temperature, top_p and generator say."""
    x = torch.tensor(logits)
    best = max(range(len(logits)), key=lambda i: logits[i])
    for t, top_p in ((0.3, 1.0), (5.0, 0.5)):
        assert sampling.select_token(x, DecodeSpec(temperature=t, top_p=top_p), torch.Generator()) == best


def test_greedy_is_argmax():
    check_greedy(LOGITS)
    check_greedy([NEG, -3.0, NEG, -2.5])


def test_top_p_one_token_nucleus_and_tiny_temperature():
    # the most probable token alone reaches top_p: it is always chosen (it always stays, Holtzman eq. 3)
    assert set(draw([5.0, 0.0, 0.0], DecodeSpec(do_sample=True, top_p=0.5), n=200)) == {0}
    # T -> 0 tends to greedy: with T = 0.01 a logit gap of 1 is a factor e^100
    assert set(draw([0.0, 1.0, 0.5], DecodeSpec(do_sample=True, temperature=0.01), n=200)) == {1}


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_same_generator_seed_same_draws_and_seeds_differ(top_p):
    decode = DecodeSpec(do_sample=True, temperature=1.0, top_p=top_p)
    x = torch.tensor(LOGITS)

    def seq(seed: int) -> list[int]:
        g = torch.Generator().manual_seed(seed)
        return [sampling.select_token(x, decode, g) for _ in range(40)]

    assert seq(5) == seq(5)  # the request's generator alone decides the draws (no global RNG)
    assert seq(5) != seq(6)


def test_full_nucleus_draws_in_vocabulary_order():
    """top_p = 1 is plain multinomial sampling over the vocabulary in token order, so seeded outputs are
    those of ``torch.multinomial(softmax(l / T))`` (a nucleus path, sorting first, would draw other tokens
    from the same random numbers)."""
    x = torch.tensor(LOGITS)
    decode = DecodeSpec(do_sample=True, temperature=1.7)
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    probs = torch.tensor(oracle(LOGITS, 1.7, 1.0), dtype=torch.float32)
    got = [sampling.select_token(x, decode, g) for _ in range(50)]
    assert got == [int(torch.multinomial(probs, 1, generator=ref)) for _ in range(50)]


def test_nucleus_boundary_is_reached_not_passed():
    """The smallest prefix whose mass reaches top_p: four equal tokens (p = 1/4, exact in float32) and
    top_p = 1/2 keep exactly two, the mass before the third being exactly 1/2."""
    counts = draw([0.0, 0.0, 0.0, 0.0], DecodeSpec(do_sample=True, top_p=0.5), n=400)
    assert len(counts) == 2 and min(counts.values()) > 150


# --------------------------------------------------------------------------------------- per-request seeds
SAMPLE = DecodeSpec(do_sample=True, temperature=1.5, max_new_tokens=10, seed=0)


def _req(i: int, seed: int | None) -> dict:
    return {"prompt": ["what is in the picture?", "describe the image please", "is there a red circle?"][i],
            "image": make_image(i), "seed": seed}


def check_request_seeds() -> None:
    """Same seed same tokens; different seeds differ; a request's tokens do not depend on its batch."""
    lvlm = tiny("tiny-llava")
    solo = {s: generate(lvlm, [_req(1, s)], decode=SAMPLE)[0].token_ids for s in (11, 12, 13)}
    assert len({tuple(t) for t in solo.values()}) == 3, "different request seeds gave the same tokens"
    again = generate(lvlm, [_req(1, 11)], decode=SAMPLE)[0].token_ids
    assert again == solo[11]
    # in a batch, at another index, next to requests with other seeds (and one with the decode seed)
    mixed = generate(lvlm, [_req(0, 5), _req(2, None), _req(1, 12), _req(1, 11)], decode=SAMPLE)
    assert mixed[2].token_ids == solo[12] and mixed[3].token_ids == solo[11]
    one_at_a_time = generate(lvlm, [_req(0, 5), _req(1, 13)], decode=SAMPLE, max_batch=1)
    assert one_at_a_time[1].token_ids == solo[13]
    # no request seed: the decode seed; a request seed overrides it
    assert generate(lvlm, [_req(1, None)], decode=SAMPLE.model_copy(update={"seed": 12}))[0].token_ids == solo[12]
    assert mixed[1].token_ids == generate(lvlm, [_req(2, 0)], decode=SAMPLE)[0].token_ids


def test_request_seeds():
    check_request_seeds()


# --------------------------------------------------------------------------------------- tests of the tests
def _temperature_multiplies(mp):
    plant(mp, sampling, "select_token", "/ decode.temperature", "* decode.temperature", also=(batch_mod,))


def _top_p_keeps_one_more(mp):
    plant(mp, sampling, "select_token", "(sorted_p.cumsum(0) - sorted_p) < decode.top_p",
          "(sorted_p.cumsum(0) - sorted_p) <= decode.top_p + 0.2", also=(batch_mod,))


def _top_p_ignored(mp):
    plant(mp, sampling, "select_token", "if decode.top_p < 1.0:", "if False:", also=(batch_mod,))


def _request_seed_ignored(mp):
    plant(mp, Entry, "prepare", "req.seed if req.seed is not None else self.decode.seed", "self.decode.seed")


def _all_cases():
    for case in CASES:
        check_sampling_distribution(*case)


@pytest.mark.parametrize(("bug", "check"), [
    (_temperature_multiplies, _all_cases),
    (_top_p_keeps_one_more, _all_cases),
    (_top_p_ignored, _all_cases),
    (_request_seed_ignored, check_request_seeds),
], ids=["logits*temperature", "top-p-keeps-one-more", "top-p-ignored", "request-seed-ignored"])
def test_planted_bug_fails_the_oracle(bug, check, monkeypatch):
    bug(monkeypatch)
    with pytest.raises(AssertionError):
        check()
