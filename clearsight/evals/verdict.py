"""The verdict that leads a report: per system, the differences from the baseline that are significant after
Holm's correction, in plain words, plus why a method cannot act on this model where that can be known.

Nothing here is hard-coded per result: the words come from ``results.stats`` (each difference's CI and
Holm-adjusted p-value) and from the methods' declared requirements checked against the model's config
(:func:`cannot_act`). A system whose outputs equal the baseline's on every sample is said to be identical.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clearsight.evals.job import SystemSpec
    from clearsight.evals.report import EvalResults
    from clearsight.evals.stats import Difference

def _model_config(model: str) -> dict[str, Any] | None:
    """The model's config.json, where it can be read without loading weights (shipped or local folder)."""
    from clearsight.models.shipped import shipped_model_path

    path: Path | None = None
    if (shipped := shipped_model_path(model)) is not None:
        path = shipped / "config.json"
    elif not model.startswith("builtin:"):
        path = Path(model).expanduser() / "config.json"
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cannot_act(system: SystemSpec) -> str | None:
    """Why a system's mitigations cannot act as designed on its model, from each mitigation's own
    ``cannot_act_on`` rule checked against the model's config (e.g. CCA on a checkpoint not trained with it,
    VAR where no token can reach its sink threshold); None when nothing says so (or the config cannot be
    read without loading)."""
    from clearsight.mitigations import parse_mitigations

    cfg = _model_config(system.model)
    if cfg is None:
        return None
    reasons = [why for m in parse_mitigations(system.mitigations) if (why := m.cannot_act_on(cfg))]
    return "; ".join(reasons) or None


def _pts(x: float | None, signed: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}"


def describe(d: Difference) -> str:
    """One difference in words: ``partner yes-rate +5.3 points [+3.9, +6.7]``."""
    where = f" ({d.split})" if d.split and d.split != "partner" else ""
    return f"{d.label}{where} {_pts(d.estimate)} points [{_pts(d.low)}, {_pts(d.high)}]"


def _reading(sig: list[Difference], diffs: list[Difference]) -> str | None:
    """The first plain-words reading a registered benchmark gives of these differences (each benchmark reads
    only its own metrics; None when none tells one)."""
    from clearsight.evals.benchmarks import registered

    for cls in registered().values():
        if (reading := cls.verdict_reading(sig, diffs)) is not None:
            return reading
    return None


def verdict_lines(results: EvalResults) -> dict[str, str]:
    """System -> its verdict sentence (every system but the baseline). Empty without a baseline."""
    st = results.stats
    if st is None or st.baseline is None:
        return {}
    reasons: dict[str, str] = results.notes.get("cannot_act", {})
    out: dict[str, str] = {}
    for s in results.systems:
        if s.name == st.baseline:
            continue
        diffs = [d for d in st.differences if d.system == s.name]
        if not diffs:
            continue
        sig = [d for d in diffs if d.significant]  # in the benchmarks' own order of their measures
        if all(d.identical for d in diffs):
            text = f"identical to {st.baseline} on every question and caption"
        elif sig:
            text = "; ".join(describe(d) for d in sig) + ", significant"
            reading = _reading(sig, diffs)
            if reading:
                text += f": {reading}"
        else:
            text = f"no difference from {st.baseline} is significant after correction"
        if s.name in reasons:
            text += f" (cannot act on this model: {reasons[s.name]})"
        out[s.name] = text
    return out


def render_verdict(results: EvalResults) -> str:
    """The Markdown verdict section (empty string without a baseline)."""
    lines = verdict_lines(results)
    st = results.stats
    if not lines or st is None:
        return ""
    n_sys = len(lines)
    head = (f"## Verdict: differences from `{st.baseline}`\n\n"
            f"Significant = Holm-adjusted p < {1 - st.confidence:.2f} over the {n_sys} "
            f"system{'s' if n_sys != 1 else ''} compared "
            f"(per metric); [{100 * st.confidence:.0f}% paired bootstrap CI], {st.resamples} resamples, "
            f"seed {st.seed}. Points = percentage points.\n")
    return head + "\n" + "\n".join(f"- **{name}**: {text}." for name, text in lines.items()) + "\n"
