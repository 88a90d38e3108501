"""Uncertainty for every reported figure and every difference from the baseline (issue 16).

Every metric the evals report is a ratio of per-sample sums, ``sum(num_i) / sum(den_i)``: an accuracy or
a yes-rate (den = 1 per question), an F1 (``2 TP / (2 TP + FP + FN)``, so num = 2 tp_i, den = 2 tp_i +
fp_i + fn_i), a share of captions (den = 1 per caption), a share of mentions (hallucinated mentions /
mentions per caption), and so on. Each benchmark builds its own :class:`Measure` objects (its metrics
module), which hold those per-sample arrays for every system over the same
samples, so one routine gives

- each system's own figure with a 95% CI: Wilson's score interval (Wilson 1927) for proportions of
  independent samples (via ``scipy.stats.binomtest(...).proportion_ci(method="wilson")``), otherwise a
  percentile bootstrap over the samples (Efron & Tibshirani 1993, ch. 13);
- each system's difference from the baseline, *paired* over the same samples: a paired percentile
  bootstrap CI (the same resampled indices for both systems), and a p-value: the exact McNemar test for
  paired proportions (McNemar 1947; exact form: a two-sided binomial test of the discordant pairs,
  ``scipy.stats.binomtest(b, b + c, 0.5)``), otherwise the bootstrap p-value (twice the smaller share of
  resampled differences on either side of 0, with the +1 correction of Davison & Hinkley 1997, eq. 4.11);
- Holm's step-down correction (Holm 1979) over one family = one metric (benchmark, metric, split) across
  the systems compared with the baseline. A difference is called significant only when its Holm-adjusted
  p-value is below ``1 - confidence``.

The bootstrap is vectorised: the resampled indices of all resamples become a count matrix ``W``
(resamples x samples), and every system's statistic is ``(W @ num) / (W @ den)`` in one product. The
resamples are seeded per sample set (benchmark, split) from the job's stats seed, so a rerun -- or
``clearsight report DIR`` from the cache -- gives the same numbers.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_RESAMPLES = 2000
DEFAULT_CONFIDENCE = 0.95


class StatsSettings(BaseModel):
    """How the uncertainty is computed (recorded in results.json with the numbers)."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(0, description="seed of the bootstrap resamples")
    resamples: int = Field(DEFAULT_RESAMPLES, ge=100, le=100_000, description="bootstrap resamples")
    confidence: float = Field(DEFAULT_CONFIDENCE, gt=0.5, lt=1.0, description="CI level; 1 - it is the Holm alpha")


# ------------------------------------------------------------------------------------------ primitives
def wilson_interval(k: int, n: int, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Wilson (1927) score interval of the proportion k / n (scipy's implementation).

    >>> [round(x, 4) for x in wilson_interval(58, 100)]
    [0.4821, 0.672]
    """
    from scipy.stats import binomtest

    if n <= 0:
        return (math.nan, math.nan)
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_exact(baseline: Sequence[bool] | np.ndarray, other: Sequence[bool] | np.ndarray
                  ) -> tuple[float, int, int]:
    """Exact McNemar test of two paired binary outcomes: (two-sided p, b, c).

    b = samples where only the baseline is positive, c = only the other. Under H0 each discordant pair
    falls either way with probability 1/2, so p is the two-sided binomial test of b in b + c
    (McNemar 1947, exact form); no discordant pair gives p = 1.

    >>> mcnemar_exact([1, 1, 1, 0], [0, 0, 1, 1])
    (1.0, 2, 1)
    """
    from scipy.stats import binomtest

    a = np.asarray(baseline, dtype=bool)
    o = np.asarray(other, dtype=bool)
    b = int(np.sum(a & ~o))
    c = int(np.sum(~a & o))
    if b + c == 0:
        return (1.0, b, c)
    return (float(binomtest(b, b + c, 0.5).pvalue), b, c)


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm (1979) step-down adjusted p-values, in the input order.

    Sorted ascending, the j-th smallest (j from 1) is multiplied by (m - j + 1); the running maximum keeps
    the adjusted values monotone, and they are capped at 1. Reject H_j iff adjusted p_j < alpha.

    >>> holm([0.01, 0.04, 0.03, 0.005])
    [0.03, 0.06, 0.06, 0.02]
    """
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    out = [1.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * float(p_values[i])))
        out[i] = round(running, 15)
    return out


def bootstrap_counts(n: int, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of n samples is drawn in each resample (resamples x n), i.e. the ordinary
    bootstrap (n draws with replacement) written as counts so statistics become matrix products."""
    idx = rng.integers(0, n, size=(resamples, n))
    flat = idx + (np.arange(resamples) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=resamples * n).reshape(resamples, n).astype(np.float64)


def _ratio(counts: np.ndarray, num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Resampled ratio-of-sums, resamples x columns; NaN where a resample has a zero denominator."""
    top = counts @ num
    bottom = counts @ den
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(bottom > 0, top / np.where(bottom > 0, bottom, 1.0), np.nan)


def percentile_interval(values: np.ndarray, confidence: float = DEFAULT_CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap interval (Efron & Tibshirani 1993, eq. 13.5), ignoring undefined resamples."""
    v = values[~np.isnan(values)]
    if not len(v):
        return (math.nan, math.nan)
    tail = 100 * (1 - confidence) / 2
    lo, hi = np.percentile(v, [tail, 100 - tail])
    return (float(lo), float(hi))


def bootstrap_p(diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 'difference = 0': twice the smaller share of resampled differences
    on either side of 0, (count + 1) / (R + 1) so it is never 0 (Davison & Hinkley 1997, eq. 4.11)."""
    d = diffs[~np.isnan(diffs)]
    if not len(d):
        return 1.0
    r = len(d)
    below = (np.sum(d <= 0) + 1) / (r + 1)
    above = (np.sum(d >= 0) + 1) / (r + 1)
    return float(min(1.0, 2 * min(below, above)))


def paired_bootstrap_ci(baseline: np.ndarray, other: np.ndarray, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0, confidence: float = DEFAULT_CONFIDENCE,
                        baseline_den: np.ndarray | None = None, other_den: np.ndarray | None = None
                        ) -> tuple[float, float, float]:
    """(difference, low, high) of ``sum(other)/sum(other_den) - sum(baseline)/sum(baseline_den)`` with a
    paired percentile bootstrap: both systems are resampled with the same indices (den defaults to 1s).

    >>> d, lo, hi = paired_bootstrap_ci(np.array([1, 0, 1, 1, 0, 1, 0, 0]), np.array([1, 1, 1, 1, 0, 1, 1, 0]))
    >>> round(d, 3), lo <= d <= hi
    (0.25, True)
    """
    a = np.asarray(baseline, dtype=np.float64)
    b = np.asarray(other, dtype=np.float64)
    da = np.ones_like(a) if baseline_den is None else np.asarray(baseline_den, dtype=np.float64)
    db = np.ones_like(b) if other_den is None else np.asarray(other_den, dtype=np.float64)
    counts = bootstrap_counts(len(a), resamples, np.random.default_rng(seed))
    r = _ratio(counts, np.stack([a, b], 1), np.stack([da, db], 1))
    est = b.sum() / db.sum() - a.sum() / da.sum()
    lo, hi = percentile_interval(r[:, 1] - r[:, 0], confidence)
    return (float(est), lo, hi)


# ------------------------------------------------------------------------------------------ measures
@dataclass
class Measure:
    """One metric over one sample set, per system: ``value = sum(num) / sum(den)`` over the samples.

    ``proportion``: num is 0/1 per independent sample and den is 1 (Wilson CI, McNemar test);
    ``ratio``: anything else (bootstrap CI and p-value). ``higher_is_better`` only words the verdict."""

    benchmark: str
    metric: str
    split: str | None
    kind: Literal["proportion", "ratio"]
    num: dict[str, np.ndarray]
    den: dict[str, np.ndarray]
    label: str = ""
    higher_is_better: bool | None = None

    @property
    def n(self) -> int:
        return len(next(iter(self.num.values())))


class Figure(BaseModel):
    """One system's own figure with its CI."""

    system: str
    benchmark: str
    metric: str
    split: str | None = None
    n: int
    estimate: float | None
    low: float | None
    high: float | None
    method: Literal["wilson", "bootstrap"]


class Difference(BaseModel):
    """``system - baseline`` over the same samples, with its paired CI, raw and Holm-adjusted p-values."""

    system: str
    baseline: str
    benchmark: str
    metric: str
    split: str | None = None
    label: str = ""
    n: int
    estimate: float | None
    low: float | None
    high: float | None
    test: Literal["mcnemar-exact", "bootstrap"]
    p_value: float
    p_holm: float
    significant: bool
    discordant: list[int] | None = Field(None, description="McNemar's b (only the baseline) and c (only the system)")
    identical: bool = Field(False, description="the per-sample values of both systems are identical")
    higher_is_better: bool | None = None


class StatsReport(BaseModel):
    """Every figure with its CI and every difference from the baseline (issue 16)."""

    baseline: str | None
    seed: int
    resamples: int
    confidence: float
    correction: str = "holm"
    family: str = "one metric (benchmark, metric, split) across the systems compared with the baseline"
    figures: list[Figure] = Field(default_factory=list)
    differences: list[Difference] = Field(default_factory=list)

    def figure(self, system: str, benchmark: str, metric: str, split: str | None = None) -> Figure | None:
        return next((f for f in self.figures if (f.system, f.benchmark, f.metric, f.split)
                     == (system, benchmark, metric, split)), None)

    def difference(self, system: str, benchmark: str, metric: str, split: str | None = None) -> Difference | None:
        return next((d for d in self.differences if (d.system, d.benchmark, d.metric, d.split)
                     == (system, benchmark, metric, split)), None)


def _nan_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _ratio_value(num: np.ndarray, den: np.ndarray) -> float:
    d = float(den.sum())
    return float(num.sum()) / d if d > 0 else math.nan


def compute_stats(measures: Sequence[Measure], systems: Sequence[str], baseline: str | None,
                  settings: StatsSettings | None = None) -> StatsReport:
    """Figures and paired differences for every measure; Holm over the systems of each measure."""
    s = settings or StatsSettings()
    alpha = 1 - s.confidence
    report = StatsReport(baseline=baseline, seed=s.seed, resamples=s.resamples, confidence=s.confidence)
    counts_cache: dict[tuple[str, str | None, int], np.ndarray] = {}
    for m in measures:
        names = [x for x in systems if x in m.num]
        if not names or m.n == 0:
            continue
        key = (m.benchmark, m.split, m.n)
        if key not in counts_cache:
            # one seeded stream per sample set: every metric of a set shares the resampled indices
            tag = zlib.crc32(f"{m.benchmark}/{m.split}/{m.n}".encode())
            counts_cache[key] = bootstrap_counts(m.n, s.resamples, np.random.default_rng([s.seed, tag]))
        counts = counts_cache[key]
        num = np.stack([np.asarray(m.num[x], dtype=np.float64) for x in names], 1)
        den = np.stack([np.asarray(m.den[x], dtype=np.float64) for x in names], 1)
        boot = _ratio(counts, num, den)
        for j, name in enumerate(names):
            est = _ratio_value(num[:, j], den[:, j])
            if m.kind == "proportion":
                lo, hi = wilson_interval(int(num[:, j].sum()), int(den[:, j].sum()), s.confidence)
                method: Literal["wilson", "bootstrap"] = "wilson"
            else:
                lo, hi = percentile_interval(boot[:, j], s.confidence)
                method = "bootstrap"
            report.figures.append(Figure(system=name, benchmark=m.benchmark, metric=m.metric, split=m.split,
                                         n=m.n, estimate=_nan_none(est), low=_nan_none(lo), high=_nan_none(hi),
                                         method=method))
        if baseline is None or baseline not in names:
            continue
        b = names.index(baseline)
        family: list[Difference] = []
        for j, name in enumerate(names):
            if j == b:
                continue
            diff = boot[:, j] - boot[:, b]
            est = _ratio_value(num[:, j], den[:, j]) - _ratio_value(num[:, b], den[:, b])
            lo, hi = percentile_interval(diff, s.confidence)
            identical = bool(np.array_equal(num[:, j], num[:, b]) and np.array_equal(den[:, j], den[:, b]))
            discordant = None
            if m.kind == "proportion":
                p, nb, nc = mcnemar_exact(num[:, b] > 0, num[:, j] > 0)
                discordant, test = [nb, nc], "mcnemar-exact"
            else:
                p, test = (1.0 if identical else bootstrap_p(diff)), "bootstrap"
            family.append(Difference(system=name, baseline=baseline, benchmark=m.benchmark, metric=m.metric,
                                     split=m.split, label=m.label or m.metric, n=m.n, estimate=_nan_none(est),
                                     low=_nan_none(lo), high=_nan_none(hi), test=test,  # type: ignore[arg-type]
                                     p_value=p, p_holm=p, significant=False, discordant=discordant,
                                     identical=identical, higher_is_better=m.higher_is_better))
        for d, adj in zip(family, holm([d.p_value for d in family])):
            d.p_holm = adj
            d.significant = adj < alpha
        report.differences += family
    return report
