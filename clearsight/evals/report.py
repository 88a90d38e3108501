"""Stage 3 of shared/evals.md: ``results.json``, ``report.md`` and PNG plots per benchmark.

``results.json`` carries every number plus the provenance the reference notes ask for (reference/evals.md
section 6, point 1): data file sha256s and N per split, the POPE parser, the decode spec per system, the
CHAIR image list and package versions. Everything is rendered in memory first and each file is written
atomically, so a failure never leaves a half-written report.
"""

from __future__ import annotations

import io
import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from clearsight.evals._io import atomic_write_bytes, atomic_write_text
from clearsight.evals.datasets.pope import SPLITS, PopeFile, PopeReport
from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.chair import ChairResult
from clearsight.evals.metrics.crosscheck import Correlation, CrossCheckResult
from clearsight.evals.metrics.partner import PartnerResult
from clearsight.evals.stats import StatsReport

VERSIONED_PACKAGES = ("clearsight", "torch", "transformers", "numpy", "scipy", "datasets", "pillow", "inflect",
                      "pydantic", "matplotlib")


class DataFile(BaseModel):
    path: str
    sha256: str
    n: int
    split: str | None = None
    layout: str | None = None

    @classmethod
    def from_pope(cls, f: PopeFile) -> DataFile:
        return cls(path=f.path, sha256=f.sha256, n=f.n, split=f.split, layout=f.layout)


class SystemResult(BaseModel):
    """One system = model + mitigations + decode spec."""

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    decode: dict[str, Any] = Field(default_factory=dict)
    pope: PopeReport | None = None
    partner: PartnerResult | None = None
    chair: ChairResult | None = None


class EvalResults(BaseModel):
    systems: list[SystemResult]
    data_files: list[DataFile] = Field(default_factory=list)
    pope_parser: str | None = None
    chair_image_ids: list[int] | None = None
    chair_seed: int | None = None
    crosscheck: CrossCheckResult | None = None
    correlations: list[Correlation] = Field(default_factory=list)
    stats: StatsReport | None = None
    notes: dict[str, Any] = Field(default_factory=dict)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _f(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


Column = tuple[str, str, str | None, str]  # benchmark, metric, split, header


def _pope_columns(results: EvalResults) -> list[Column]:
    pope_sys = [s for s in results.systems if s.pope is not None]
    splits = [sp for sp in SPLITS if any(sp in s.pope.splits for s in pope_sys)]  # type: ignore[union-attr]
    return [("pope", m, sp, f"{sp} {h}") for sp in splits for m, h in (("accuracy", "acc"), ("f1", "F1"))]


PARTNER_COLUMNS: list[Column] = [("pope", "partner_yes", "partner", "partner yes%"),
                                 ("pope", "control_yes", "partner", "other-absent yes%"),
                                 ("pope", "present_yes", "partner", "present yes%")]
CHAIR_COLUMNS: list[Column] = [("chair", "chair_s", None, "CHAIR_s"), ("chair", "chair_i", None, "CHAIR_i"),
                               ("chair", "recall", None, "recall"),
                               ("chair", "partner_share", None, "partner share of halluc."),
                               ("chair", "partner_captions", None, "captions naming a partner")]


def _ci_cell(st: StatsReport, system: str, col: Column) -> str:
    f = st.figure(system, col[0], col[1], col[2])
    if f is None or f.estimate is None:
        return "-"
    if f.low is None or f.high is None:
        return _f(f.estimate, True)
    return f"{_f(f.estimate, True)} [{_f(f.low, True)}, {_f(f.high, True)}]"


def _pts(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:+.1f}"


def _diff_cell(st: StatsReport, system: str, col: Column) -> str:
    d = st.difference(system, col[0], col[1], col[2])
    if d is None:
        return "-"
    if d.identical:
        return "identical"
    mark = " **\\***" if d.significant else ""
    return f"{_pts(d.estimate)} [{_pts(d.low)}, {_pts(d.high)}] p={d.p_holm:.2g}{mark}"


def _stats_tables(results: EvalResults, columns: list[Column], title: str) -> list[str]:
    """Each system's figures with 95% CIs, then each system's paired difference from the baseline."""
    st = results.stats
    if st is None:
        return []
    columns = [c for c in columns if any(st.figure(s.name, c[0], c[1], c[2]) for s in results.systems)]
    if not columns:
        return []
    names = [s.name for s in results.systems if any(st.figure(s.name, c[0], c[1], c[2]) for c in columns)]
    conf = f"{100 * st.confidence:.0f}%"
    n = {c[3]: next(f.n for f in st.figures if (f.benchmark, f.metric, f.split) == c[:3]) for c in columns}
    header = ["system"] + [f"{c[3]} (N={n[c[3]]})" for c in columns]
    parts = [f"### {title}: figures with {conf} CIs (%)", "",
             _table(header, [[x] + [_ci_cell(st, x, c) for c in columns] for x in names]), ""]
    if st.baseline is not None and st.baseline in names:
        others = [x for x in names if x != st.baseline]
        if others:
            parts += [f"### {title}: difference from `{st.baseline}` (points, paired {conf} CI, Holm-adjusted p; "
                      "\\* significant)", "",
                      _table(["system"] + [c[3] for c in columns],
                             [[x] + [_diff_cell(st, x, c) for c in columns] for x in others]), ""]
    return parts


def _stats_method(st: StatsReport) -> list[str]:
    return ["## Statistics", "",
            f"Paired over the same samples against `{st.baseline}`. CIs at {100 * st.confidence:.0f}%: Wilson (1927) "
            f"for proportions (accuracy, yes-rates, CHAIR_s), percentile bootstrap otherwise; differences: paired "
            f"percentile bootstrap ({st.resamples} resamples, seed {st.seed}). p-values: exact McNemar (binomial test "
            "of the discordant pairs) for proportions, bootstrap otherwise; Holm (1979) over the systems of each "
            "metric. See docs/evals.md.", ""]


def _decode_section(results: EvalResults) -> list[str]:
    """One line when every system shares the decode settings, else a row per system."""
    settings = {json.dumps(s.decode, sort_keys=True) for s in results.systems}
    if len(settings) == 1:
        return ["## Decode settings", "", f"All {len(results.systems)} systems: `{settings.pop()}`", ""]
    rows = [[s.name, f"`{json.dumps(s.decode, sort_keys=True)}`"] for s in results.systems]
    return ["## Decode settings", "", _table(["system", "decode"], rows), ""]


def render_markdown(results: EvalResults) -> str:
    """Markdown report: the verdict, then one table per benchmark (systems as rows, percentages for rates),
    each with the figures' CIs and the differences from the baseline."""
    from clearsight.evals.verdict import render_verdict

    parts = ["# Evaluation report", ""]
    verdict = render_verdict(results)
    if verdict:
        parts += [verdict]
    pope_sys = [s for s in results.systems if s.pope is not None]
    if pope_sys:
        splits = [sp for sp in SPLITS if any(sp in s.pope.splits for s in pope_sys)]  # type: ignore[union-attr]
        header = ["system"] + [f"{sp} {m}" for sp in splits for m in ("acc", "F1", "yes%", "unparsed")]
        header += ["mean F1", "pooled F1"]
        rows = []
        for s in pope_sys:
            rep = s.pope
            assert rep is not None
            row = [s.name]
            for sp in splits:
                m = rep.splits.get(sp)
                row += ([_f(m.accuracy, True), _f(m.f1, True), _f(m.yes_ratio, True), str(m.unparsed)]
                        if m else ["-"] * 4)
            rows.append(row + [_f(rep.mean_f1, True), _f(rep.pooled.f1, True)])
        parser = results.pope_parser or pope_sys[0].pope.parser  # type: ignore[union-attr]
        parts += [f"## POPE (parser: `{parser}`)", "", _table(header, rows), ""]
        parts += _stats_tables(results, _pope_columns(results), "POPE")
    if any(s.partner is not None for s in results.systems) or (
            results.stats is not None and any(f.split == "partner" for f in results.stats.figures)):
        parts += ["## Prior-driven hallucination: questions about the absent partner of a present shape", "",
                  "Partner = the absent partner of a present shape (label no); other-absent = an absent shape that "
                  "is no present shape's partner (label no); present = the shape whose partner is absent (label "
                  "yes).", ""]
        parts += _stats_tables(results, PARTNER_COLUMNS, "Partner questions")
    chair_sys = [s for s in results.systems if s.chair is not None]
    if chair_sys:
        rows = [[s.name, _f(s.chair.chair_s, True), _f(s.chair.chair_i, True),  # type: ignore[union-attr]
                 _f(s.chair.recall, True), f"{s.chair.mean_length:.1f}",  # type: ignore[union-attr]
                 str(s.chair.n_captions)] for s in chair_sys]  # type: ignore[union-attr]
        header = ["system", "CHAIR_s", "CHAIR_i", "recall", "len (words)", "N"]
        parts += ["## CHAIR", "", _table(header, rows), ""]
        parts += _stats_tables(results, CHAIR_COLUMNS, "CHAIR")
    if results.crosscheck is not None:
        cc = results.crosscheck
        rows = [[str(i + 1), s, _f(cc.scores[s]), str(cc.n_sentences.get(s, 0))]
                for i, s in enumerate(cc.ranking)]
        parts += [f"## CrossCheck (scorer: `{cc.scorer}`, lower = less hallucination)", "",
                  _table(["rank", "system", "score", "sentences"], rows), ""]
    if results.correlations:
        rows = [[c.reference, _f(c.pearson), _f(c.spearman), str(len(c.systems))]
                for c in results.correlations]
        parts += ["## Correlation with reference metrics", "",
                  _table(["reference", "Pearson", "Spearman", "systems"], rows), ""]
    if results.stats is not None and results.stats.baseline is not None:
        parts += _stats_method(results.stats)
    if results.data_files:
        rows = [[f.split or "-", str(f.n), f"`{f.sha256[:12]}`", f.path] for f in results.data_files]
        parts += ["## Data", "", _table(["split", "N", "sha256", "file"], rows), ""]
    parts += _decode_section(results)
    return "\n".join(parts)


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    plt = _plt()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def _bar_png(title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> bytes:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(groups) * max(1, len(series)) / 2 + 2), 3.2))
    width = 0.8 / max(1, len(series))
    for k, (label, vals) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
        ax.bar(xs, vals, width=width, label=label)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    return _png(fig)


def _forest_png(st: StatsReport, columns: list[Column], title: str) -> bytes | None:
    """One panel per column: each system's difference from the baseline with its CI, a line at 0."""
    panels = [(c, [d for d in st.differences if (d.benchmark, d.metric, d.split) == c[:3]]) for c in columns]
    panels = [(c, ds) for c, ds in panels if ds]
    if not panels:
        return None
    plt = _plt()
    n_sys = max(len(ds) for _, ds in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 1.2, 0.32 * n_sys + 1.4), squeeze=False,
                             sharey=True)
    for ax, (col, ds) in zip(axes[0], panels):
        ys = list(range(len(ds)))[::-1]
        for y, d in zip(ys, ds):
            est, lo, hi = (100 * (v if v is not None else float("nan")) for v in (d.estimate, d.low, d.high))
            colour = "tab:red" if d.significant else "tab:gray"
            ax.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt="o", color=colour, capsize=3, ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(ys)
        ax.set_yticklabels([d.system for d in ds], fontsize=8)
        ax.set_title(col[3], fontsize=9)
        ax.set_xlabel(f"points vs {st.baseline}", fontsize=8)
    fig.suptitle(f"{title}: difference from {st.baseline} ({100 * st.confidence:.0f}% CI; red = significant "
                 "after Holm)", fontsize=9)
    return _png(fig)


def _raw_png(st: StatsReport, systems: list[str], columns: list[Column]) -> bytes | None:
    """The raw figures with their CIs as error bars, one panel per column."""
    panels = [(c, [st.figure(x, c[0], c[1], c[2]) for x in systems]) for c in columns]
    panels = [(c, fs) for c, fs in panels if any(f is not None and f.estimate is not None for f in fs)]
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(3.0 * len(panels) + 1.2, 0.32 * len(systems) + 1.4),
                             squeeze=False, sharey=True)
    ys = list(range(len(systems)))[::-1]
    for ax, (col, fs) in zip(axes[0], panels):
        for y, f in zip(ys, fs):
            if f is None or f.estimate is None or f.low is None or f.high is None:
                continue
            est, lo, hi = 100 * f.estimate, 100 * f.low, 100 * f.high
            ax.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt="o", capsize=3, ms=4,
                        color="black" if f.system == st.baseline else "tab:blue")
        ax.set_yticks(ys)
        ax.set_yticklabels(systems, fontsize=8)
        ax.set_title(col[3], fontsize=9)
        ax.set_xlabel("%", fontsize=8)
    fig.suptitle(f"Figures with {100 * st.confidence:.0f}% CIs", fontsize=9)
    return _png(fig)


def render_plots(results: EvalResults) -> dict[str, bytes]:
    """PNG bytes per plot name: a forest plot per benchmark's metrics (differences from the baseline with
    CIs, a line at 0), one plot of the raw figures with error bars, and the CrossCheck scores."""
    plots: dict[str, bytes] = {}
    st = results.stats
    if st is not None:
        pope_cols = _pope_columns(results) if any(s.pope for s in results.systems) else []
        groups = {"forest_pope.png": (pope_cols, "POPE"),
                  "forest_partner.png": (PARTNER_COLUMNS, "Partner questions"),
                  "forest_chair.png": (CHAIR_COLUMNS, "CHAIR")}
        for name, (cols, title) in groups.items():
            png = _forest_png(st, cols, title)
            if png is not None:
                plots[name] = png
        raw_cols = [c for c in pope_cols if c[1] == "accuracy"] + PARTNER_COLUMNS + CHAIR_COLUMNS[:3]
        png = _raw_png(st, [s.name for s in results.systems], raw_cols)
        if png is not None:
            plots["figures.png"] = png
    if results.crosscheck is not None:
        cc = results.crosscheck
        series = {"score": [cc.scores[s] for s in cc.ranking]}
        plots["crosscheck.png"] = _bar_png(f"CrossCheck ({cc.scorer})", cc.ranking, series,
                                           "hallucination score")
    return plots


def write_report(results: EvalResults, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, report.md and the plots into ``out_dir``. Returns name -> path."""
    if not results.systems:
        raise EvalInputError("write_report: no systems in the results; score at least one system")
    names = [s.name for s in results.systems]
    if len(set(names)) != len(names):
        raise EvalInputError(f"write_report: duplicate system names {names}; give each system a unique name")
    payload = results.model_dump(mode="json")
    payload["package_versions"] = package_versions()
    # Render everything before writing anything.
    blobs: dict[str, bytes] = {
        "results.json": (json.dumps(payload, indent=2, allow_nan=True) + "\n").encode("utf-8"),
        "report.md": render_markdown(results).encode("utf-8"),
        **render_plots(results),
    }
    out = Path(out_dir)
    paths = {}
    for name, data in blobs.items():
        paths[name] = out / name
        if name.endswith(".md"):
            atomic_write_text(paths[name], data.decode("utf-8"))
        else:
            atomic_write_bytes(paths[name], data)
    return paths
