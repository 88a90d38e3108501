"""The verdict that leads a report: per system, the differences from the baseline that are significant after
Holm's correction, in plain words, plus why a method cannot act on this model where that can be known.

Nothing here is hard-coded per result: the words come from ``results.stats`` (each difference's CI and
Holm-adjusted p-value) and from the methods' declared requirements checked against the model's config
(:func:`cannot_act`). A system whose outputs equal the baseline's on every sample is said to be identical.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clearsight.evals.job import SystemSpec
    from clearsight.evals.report import EvalResults
    from clearsight.evals.stats import Difference

# the order effects are listed in: the prior-driven hallucination first, then POPE, then captions
_ORDER = {("pope", "partner_yes"): 0, ("pope", "control_yes"): 1, ("pope", "present_yes"): 2,
          ("pope", "accuracy"): 3, ("pope", "f1"): 4, ("pope", "yes_ratio"): 5, ("chair", "chair_s"): 6,
          ("chair", "chair_i"): 7, ("chair", "recall"): 8, ("chair", "partner_share"): 9,
          ("chair", "partner_captions"): 10}


def _model_config(model: str) -> dict[str, Any] | None:
    """The model's config.json, where it can be read without loading weights (shipped or local folder)."""
    path: Path | None = None
    if model == "builtin:shapes-llava":
        from clearsight.models.shipped import shapes_llava_path

        path = shapes_llava_path() / "config.json"
    elif not model.startswith("builtin:"):
        path = Path(model).expanduser() / "config.json"
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cannot_act(system: SystemSpec) -> str | None:
    """Why a system's mitigations cannot act as designed on its model, from their declared requirements
    and the model's config; None when nothing says so (or the config cannot be read without loading).

    - a method that needs a checkpoint trained with it (a ``trained`` field: CCA, modality-mutual
      attention) on a model whose config does not record it (``clearsight_trained_with``);
    - VAR: a token is a sink iff max_d |x_d / rms(x)| > tau, and |x_d| <= sqrt(sum x^2) = sqrt(H) rms(x),
      so with sqrt(hidden size H) <= tau no token can be a sink (Kang et al. 2025, Sec. 4.1).
    """
    from clearsight.mitigations import parse_mitigations

    cfg = _model_config(system.model)
    if cfg is None:
        return None
    text = cfg.get("text_config") or cfg
    hidden = text.get("hidden_size")
    recorded = cfg.get("clearsight_trained_with") or []
    reasons = []
    for m in parse_mitigations(system.mitigations):
        if hasattr(m, "trained") and not m.trained and m.name not in recorded and not cfg.get(m.name):
            reasons.append(f"{m.name} needs a checkpoint trained with it and this model's config does not record one")
        tau = getattr(m, "tau", None)
        if m.name == "var" and isinstance(hidden, int) and tau is not None and math.sqrt(hidden) <= tau:
            reasons.append(f"var can find no sinks: |x_d / rms(x)| <= sqrt({hidden}) = {math.sqrt(hidden):.1f}, "
                           f"not above tau = {tau:g}")
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
    """A plain-words reading of the partner-question effects, when they tell one: ``sig`` are the
    significant differences, ``diffs`` all of the system's (to know which kinds were measured)."""
    measured = {d.metric for d in diffs if d.split == "partner"}
    by = {d.metric: d for d in sig if d.split == "partner"}
    up = {k: (by[k].estimate or 0) > 0 for k in by}
    kinds = ("partner_yes", "control_yes", "present_yes")
    if all(k in by for k in kinds) and all(up[k] for k in kinds):
        return "more yes to everything"
    if all(k in by for k in kinds) and not any(up[k] for k in kinds):
        return "more no to everything"
    if "partner_yes" in by and not up["partner_yes"] and "present_yes" in measured and "present_yes" not in by:
        return "fewer yes to absent partners, not fewer to present shapes"
    if "partner_yes" in by and up["partner_yes"] and "control_yes" in measured and "control_yes" not in by:
        return "more yes to absent partners, not to other absent shapes"
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
        sig = sorted((d for d in diffs if d.significant), key=lambda d: (_ORDER.get((d.benchmark, d.metric), 99),
                                                                        d.split or ""))
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
