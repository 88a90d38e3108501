"""Statistics (issue 16) against hand-computed cases and independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from clearsight.evals.stats import (
    Measure,
    StatsSettings,
    bootstrap_counts,
    compute_stats,
    holm,
    mcnemar_exact,
    paired_bootstrap_ci,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5% standard normal quantile


def test_wilson_matches_the_formula_by_hand():
    # Wilson (1927): (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)
    for k, n in ((58, 100), (0, 20), (20, 20), (3, 7)):
        p = k / n
        centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
        half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
        lo, hi = wilson_interval(k, n)
        assert lo == pytest.approx(max(0.0, centre - half), abs=1e-12)
        assert hi == pytest.approx(min(1.0, centre + half), abs=1e-12)
    assert [round(x, 4) for x in wilson_interval(58, 100)] == [0.4821, 0.672]


def test_mcnemar_exact_by_hand_and_against_binomtest():
    # b = 3 (only the baseline right), c = 0: p = 2 * 0.5^3 = 0.25
    p, b, c = mcnemar_exact([1, 1, 1, 1, 0], [0, 0, 0, 1, 0])
    assert (b, c) == (3, 0) and p == pytest.approx(0.25)
    assert mcnemar_exact([1, 0], [1, 0]) == (1.0, 0, 0)  # no discordant pair: nothing to test
    rng = np.random.default_rng(5)
    for _ in range(20):
        a = rng.random(60) < 0.6
        o = rng.random(60) < 0.7
        p, b, c = mcnemar_exact(a, o)
        assert b == int(np.sum(a & ~o)) and c == int(np.sum(~a & o))
        assert p == pytest.approx(binomtest(b, b + c, 0.5).pvalue, rel=1e-12)
        # independent: the two-sided exact binomial sum, by hand
        m = b + c
        tail = sum(math.comb(m, i) for i in range(min(b, c) + 1)) / 2**m
        assert p == pytest.approx(min(1.0, 2 * tail), rel=1e-9)


def test_holm_textbook_example():
    # m = 4, sorted p: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 -> max(0.06, 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # at alpha 0.05 Holm rejects the first two; Bonferroni (x 4) would reject only 0.005
    assert [p < 0.05 for p in holm([0.01, 0.04, 0.03, 0.005])] == [True, False, False, True]
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # monotone: never below an earlier step
    assert holm([]) == []


def test_paired_bootstrap_ci_equals_a_plain_loop_over_resamples():
    rng = np.random.default_rng(11)
    a = (rng.random(80) < 0.55).astype(float)
    b = np.where(rng.random(80) < 0.8, a, 1 - a)
    est, lo, hi = paired_bootstrap_ci(a, b, resamples=500, seed=3)
    assert est == pytest.approx(b.mean() - a.mean())
    # independent: resample index vectors one at a time, same seeded stream
    gen = np.random.default_rng(3)
    diffs = []
    for _ in range(500):
        idx = gen.integers(0, 80, size=80)
        diffs.append(b[idx].mean() - a[idx].mean())
    want = np.percentile(diffs, [2.5, 97.5])
    assert (lo, hi) == pytest.approx(tuple(want), abs=1e-12)
    assert paired_bootstrap_ci(a, b, resamples=500, seed=3) == (est, lo, hi)  # seeded: reproducible


def test_bootstrap_counts_are_n_draws_per_resample():
    counts = bootstrap_counts(7, 50, np.random.default_rng(0))
    assert counts.shape == (50, 7) and (counts.sum(1) == 7).all()


def test_paired_ci_covers_a_known_effect_about_95_percent():
    """Simulated paired yes/no outcomes with a true difference of +0.05 and strong pairing; over 300
    simulations the paired 95% CI must cover the truth 95% of the time. With 300 trials the binomial SD of
    the coverage is 1.3 points: the band [0.91, 0.985] is about -3 / +2.7 SD (the percentile bootstrap
    runs slightly below nominal at this n). An unpaired CI would
    over-cover here (its width ignores the positive correlation), a wrong percentile would under-cover."""
    rng = np.random.default_rng(2024)
    n, sims, true = 200, 300, 0.05
    covered = 0
    for s in range(sims):
        a = rng.random(n) < 0.60
        # b agrees with a except for flips chosen so that E[b] - E[a] = 0.08 - 0.03 = 0.05
        flip_up = (~a) & (rng.random(n) < 0.20)  # +0.4 * 0.20 = +0.08
        flip_down = a & (rng.random(n) < 0.05)  # -0.6 * 0.05 = -0.03
        b = (a | flip_up) & ~flip_down
        _, lo, hi = paired_bootstrap_ci(a.astype(float), b.astype(float), resamples=300, seed=s)
        covered += lo <= true <= hi
    assert 0.91 <= covered / sims <= 0.985, covered / sims


def _measure(values: dict[str, list[int]]) -> Measure:
    num = {k: np.array(v, dtype=float) for k, v in values.items()}
    return Measure("pope", "accuracy", "random", "proportion", num, {k: np.ones(len(v)) for k, v in num.items()})


def test_compute_stats_holm_over_the_systems_and_mcnemar_per_difference():
    base = [1] * 40 + [0] * 40
    systems = {"none": base,
               "better": [1] * 40 + [1] * 14 + [0] * 26,  # c = 14, b = 0: p = 2^-13
               "slightly": [1] * 40 + [1] * 4 + [0] * 36,  # c = 4: p = 0.125
               "same": base}
    rep = compute_stats([_measure(systems)], list(systems), "none", StatsSettings(resamples=300))
    diffs = {d.system: d for d in rep.differences}
    assert set(diffs) == {"better", "slightly", "same"}
    raw = [binomtest(14, 14).pvalue, binomtest(4, 4).pvalue, 1.0]
    assert [diffs[k].p_value for k in ("better", "slightly", "same")] == pytest.approx(raw)
    assert [diffs[k].p_holm for k in ("better", "slightly", "same")] == pytest.approx(holm(raw))
    assert diffs["better"].significant and not diffs["slightly"].significant and not diffs["same"].significant
    assert diffs["better"].estimate == pytest.approx(14 / 80) and diffs["better"].discordant == [0, 14]
    assert diffs["same"].identical and diffs["same"].estimate == 0
    fig = rep.figure("better", "pope", "accuracy", "random")
    assert fig.method == "wilson" and (fig.low, fig.high) == pytest.approx(wilson_interval(54, 80))
    assert rep.seed == 0 and rep.resamples == 300
    again = compute_stats([_measure(systems)], list(systems), "none", StatsSettings(resamples=300))
    assert again == rep  # seeded


def test_ratio_metric_uses_the_bootstrap_and_no_baseline_gives_figures_only():
    num = {"none": np.array([0, 1, 2, 0, 1.0] * 10), "x": np.array([1, 1, 2, 1, 1.0] * 10)}
    den = {"none": np.array([2, 2, 3, 1, 2.0] * 10), "x": np.array([2, 2, 3, 1, 2.0] * 10)}
    m = Measure("chair", "chair_i", None, "ratio", num, den)
    rep = compute_stats([m], ["none", "x"], "none", StatsSettings(resamples=500))
    d = rep.differences[0]
    assert d.test == "bootstrap" and d.estimate == pytest.approx(60 / 100 - 40 / 100)
    assert d.low > 0 and d.significant  # x hallucinates more on every image where they differ
    assert rep.figure("x", "chair", "chair_i").method == "bootstrap"
    alone = compute_stats([m], ["none", "x"], None, StatsSettings(resamples=500))
    assert alone.differences == [] and len(alone.figures) == 2


def test_the_bootstrap_is_fast_enough_to_run_on_every_report():
    """2000 resamples x 1000 samples x 11 systems: one count matrix and one matrix product (no timing
    assertion; the size is what a demo-sized job asks for, so a slow path would show in the suite time)."""
    rng = np.random.default_rng(0)
    names = ["none"] + [f"s{i}" for i in range(10)]
    values = {k: (rng.random(1000) < 0.8).astype(int).tolist() for k in names}
    rep = compute_stats([_measure(values)], names, "none", StatsSettings(resamples=2000))
    assert len(rep.differences) == 10
