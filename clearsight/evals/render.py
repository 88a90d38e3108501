"""Report building blocks any benchmark's section uses: tables, figures with CIs, forest and bar plots."""

from __future__ import annotations

import io
from typing import Any

from clearsight.evals.stats import StatsReport

Column = tuple[str, str, "str | None", str]  # benchmark label, metric, split, header


def fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _ci_cell(st: StatsReport, system: str, col: Column) -> str:
    f = st.figure(system, col[0], col[1], col[2])
    if f is None or f.estimate is None:
        return "-"
    if f.low is None or f.high is None:
        return fmt(f.estimate, True)
    return f"{fmt(f.estimate, True)} [{fmt(f.low, True)}, {fmt(f.high, True)}]"


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


def stats_tables(results: Any, columns: list[Column], title: str) -> list[str]:
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
             table(header, [[x] + [_ci_cell(st, x, c) for c in columns] for x in names]), ""]
    if st.baseline is not None and st.baseline in names:
        others = [x for x in names if x != st.baseline]
        if others:
            parts += [f"### {title}: difference from `{st.baseline}` (points, paired {conf} CI, Holm-adjusted p; "
                      "\\* significant)", "",
                      table(["system"] + [c[3] for c in columns],
                             [[x] + [_diff_cell(st, x, c) for c in columns] for x in others]), ""]
    return parts


def plt_module():
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig: Any) -> bytes:
    plt = plt_module()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def bar_png(title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> bytes:
    plt = plt_module()
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
    return png_bytes(fig)


def forest_png(st: StatsReport, columns: list[Column], title: str) -> bytes | None:
    """One panel per column: each system's difference from the baseline with its CI, a line at 0."""
    panels = [(c, [d for d in st.differences if (d.benchmark, d.metric, d.split) == c[:3]]) for c in columns]
    panels = [(c, ds) for c, ds in panels if ds]
    if not panels:
        return None
    plt = plt_module()
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
    return png_bytes(fig)


def raw_png(st: StatsReport, systems: list[str], columns: list[Column]) -> bytes | None:
    """The raw figures with their CIs as error bars, one panel per column."""
    panels = [(c, [st.figure(x, c[0], c[1], c[2]) for x in systems]) for c in columns]
    panels = [(c, fs) for c, fs in panels if any(f is not None and f.estimate is not None for f in fs)]
    if not panels:
        return None
    plt = plt_module()
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
    return png_bytes(fig)


