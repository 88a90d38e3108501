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

VERSIONED_PACKAGES = ("clearsight", "torch", "transformers", "numpy", "datasets", "pillow", "inflect",
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
    chair: ChairResult | None = None


class EvalResults(BaseModel):
    systems: list[SystemResult]
    data_files: list[DataFile] = Field(default_factory=list)
    pope_parser: str | None = None
    chair_image_ids: list[int] | None = None
    chair_seed: int | None = None
    crosscheck: CrossCheckResult | None = None
    correlations: list[Correlation] = Field(default_factory=list)
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


def render_markdown(results: EvalResults) -> str:
    """Markdown report: one table per benchmark, systems as rows (percentages for rates)."""
    parts = ["# Evaluation report", ""]
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
    chair_sys = [s for s in results.systems if s.chair is not None]
    if chair_sys:
        rows = [[s.name, _f(s.chair.chair_s, True), _f(s.chair.chair_i, True),  # type: ignore[union-attr]
                 _f(s.chair.recall, True), f"{s.chair.mean_length:.1f}",  # type: ignore[union-attr]
                 str(s.chair.n_captions)] for s in chair_sys]  # type: ignore[union-attr]
        header = ["system", "CHAIR_s", "CHAIR_i", "recall", "len (words)", "N"]
        parts += ["## CHAIR", "", _table(header, rows), ""]
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
    if results.data_files:
        rows = [[f.split or "-", str(f.n), f"`{f.sha256[:12]}`", f.path] for f in results.data_files]
        parts += ["## Data", "", _table(["split", "N", "sha256", "file"], rows), ""]
    decode_rows = [[s.name, f"`{json.dumps(s.decode, sort_keys=True)}`"] for s in results.systems]
    parts += ["## Decode settings", "", _table(["system", "decode"], decode_rows), ""]
    return "\n".join(parts)


def _bar_png(title: str, groups: list[str], series: dict[str, list[float]], ylabel: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def render_plots(results: EvalResults) -> dict[str, bytes]:
    """PNG bytes per plot name: POPE F1 per system per split, CHAIR_s/CHAIR_i per system, CrossCheck."""
    plots: dict[str, bytes] = {}
    pope_sys = [s for s in results.systems if s.pope is not None]
    if pope_sys:
        names = [s.name for s in pope_sys]
        series = {sp: [100 * s.pope.splits[sp].f1 if sp in s.pope.splits else 0.0  # type: ignore[union-attr]
                       for s in pope_sys] for sp in SPLITS
                  if any(sp in s.pope.splits for s in pope_sys)}  # type: ignore[union-attr]
        plots["pope_f1.png"] = _bar_png("POPE F1 per split", names, series, "F1 (%)")
    chair_sys = [s for s in results.systems if s.chair is not None]
    if chair_sys:
        names = [s.name for s in chair_sys]
        series = {"CHAIR_s": [100 * s.chair.chair_s for s in chair_sys],  # type: ignore[union-attr]
                  "CHAIR_i": [100 * s.chair.chair_i for s in chair_sys]}  # type: ignore[union-attr]
        plots["chair.png"] = _bar_png("CHAIR (lower is better)", names, series, "%")
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
