"""Stage 3 of shared/evals.md: ``results.json``, ``report.md`` and PNG plots.

The report knows no benchmark by name: each registered benchmark (``clearsight.evals.benchmarks``)
renders its own section(s) and plots from the results, and this module adds what every report has (the
verdict, the statistics method, the data files, the decode settings). ``results.json`` carries every
number plus the provenance the reference notes ask for (reference/evals.md section 6, point 1): data file
sha256s and N, each benchmark's settings that decide its numbers, the decode spec per system and package
versions. Everything is rendered in memory first and each file is written atomically, so a failure never
leaves a half-written report.
"""

from __future__ import annotations

import json
import os
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from clearsight.evals._io import atomic_write_bytes, atomic_write_text
from clearsight.evals.benchmarks.base import DataFile
from clearsight.evals.errors import EvalInputError
from clearsight.evals.render import raw_png, table
from clearsight.evals.stats import StatsReport

__all__ = ["DataFile", "EvalResults", "SystemResult", "render_markdown", "render_plots", "write_report"]

VERSIONED_PACKAGES = ("clearsight", "torch", "transformers", "numpy", "scipy", "datasets", "pillow", "inflect",
                      "pydantic", "matplotlib")


class SystemResult(BaseModel):
    """One system = model + mitigations + decode spec; each benchmark's result under its own key (its
    label), as extra fields: ``system.<label>`` or ``system["<label>"]``."""

    model_config = ConfigDict(extra="allow")

    name: str
    config: dict[str, Any] = Field(default_factory=dict)
    decode: dict[str, Any] = Field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return (self.model_extra or {})[key]


class EvalResults(BaseModel):
    """Every system's results, the statistics, and each benchmark's results-level entries (extra fields,
    e.g. a parser name or an image list, set by the benchmark that scored them)."""

    model_config = ConfigDict(extra="allow")

    systems: list[SystemResult]
    data_files: list[DataFile] = Field(default_factory=list)
    stats: StatsReport | None = None
    notes: dict[str, Any] = Field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        """A results-level entry, or ``default`` when no benchmark set it."""
        return (self.model_extra or {}).get(key, default)


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _stats_method(st: StatsReport) -> list[str]:
    return ["## Statistics", "",
            f"Paired over the same samples against `{st.baseline}`. CIs at {100 * st.confidence:.0f}%: Wilson (1927) "
            f"for proportions (a 0/1 outcome per sample), percentile bootstrap otherwise; differences: paired "
            f"percentile bootstrap ({st.resamples} resamples, seed {st.seed}). p-values: exact McNemar (binomial test "
            "of the discordant pairs) for proportions, bootstrap otherwise; Holm (1979) over the systems of each "
            "metric. See docs/evals.md.", ""]


def _decode_section(results: EvalResults) -> list[str]:
    """One line when every system shares the decode settings, else a row per system."""
    settings = {json.dumps(s.decode, sort_keys=True) for s in results.systems}
    if len(settings) == 1:
        return ["## Decode settings", "", f"All {len(results.systems)} systems: `{settings.pop()}`", ""]
    rows = [[s.name, f"`{json.dumps(s.decode, sort_keys=True)}`"] for s in results.systems]
    return ["## Decode settings", "", table(["system", "decode"], rows), ""]


def _sections() -> list[Any]:
    from clearsight.evals.benchmarks.base import registered

    return list(registered().values())


def render_markdown(results: EvalResults) -> str:
    """Markdown report: the verdict, then each benchmark's section(s) (systems as rows, percentages for
    rates, each with the figures' CIs and the differences from the baseline), then the method notes."""
    from clearsight.evals.verdict import render_verdict

    parts = ["# Evaluation report", ""]
    verdict = render_verdict(results)
    if verdict:
        parts += [verdict]
    for bench in _sections():
        parts += bench.render(results)
    if results.stats is not None and results.stats.baseline is not None:
        parts += _stats_method(results.stats)
    if results.data_files:
        rows = [[f.split or "-", str(f.n), f"`{f.sha256[:12]}`", f.path] for f in results.data_files]
        parts += ["## Data", "", table(["split", "N", "sha256", "file"], rows), ""]
    parts += _decode_section(results)
    return "\n".join(parts)


def render_plots(results: EvalResults) -> dict[str, bytes]:
    """PNG bytes per plot name: each benchmark's plots (forest plots of the differences from the baseline
    with CIs, a line at 0; its own charts) and one plot of the raw figures with error bars."""
    plots: dict[str, bytes] = {}
    raw_cols = []
    for bench in _sections():
        plots.update(bench.plots(results))
        raw_cols += bench.raw_columns(results)
    if results.stats is not None:
        png = raw_png(results.stats, [s.name for s in results.systems], raw_cols)
        if png is not None:
            plots["figures.png"] = png
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
