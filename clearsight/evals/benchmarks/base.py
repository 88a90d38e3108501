"""The ``Benchmark`` protocol: what a benchmark is to the runner, the cache, the statistics and the report.

A benchmark is data plus a few small functions, as a task is in lm-evaluation-harness; the runner knows
none by name. Each built-in (and any plug-in) subclasses :class:`Benchmark` and registers itself with
:func:`register_benchmark`; a job entry ``{kind = "...", ...}`` is validated by the registered class's
``spec_class`` (a pydantic model deriving from :class:`BenchmarkSpec`).

The life of a benchmark in a run (``clearsight.evals.runner``):

1. ``prepare(others)``: load and check its data; write nothing (``materialize`` writes files it must keep,
   once the output folder is locked);
2. ``items()``: the first round of work, every system generates each item (sample ids begin with the
   benchmark's label, so two benchmarks never share a cache entry);
3. ``follow_up(round, lookup)``: further rounds that depend on earlier outputs (CrossCheck's judge and
   implicit passes), as (system, item) pairs; they go through the same executor and cache;
4. ``score(ctx)``: pure, from cached outputs only; per-system results, per-sample measures for the
   statistics, data-file provenance and results-level fields;
5. ``render(results)`` / ``plots(results)`` (class methods): the report section(s) and PNG plots of every
   benchmark of this kind in the results, found by their result types and labels.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from clearsight.config import DecodeSpec
from clearsight.evals.errors import EvalInputError
from clearsight.evals.stats import Measure

if TYPE_CHECKING:
    from clearsight.evals.executor import WorkItem
    from clearsight.evals.job import EvalJob, SystemSpec
    from clearsight.evals.render import Column
    from clearsight.evals.report import EvalResults
    from clearsight.evals.stats import Difference


def known_choices(values: list[str], choices: Sequence[str], what: str) -> list[str]:
    """A spec's list field of named choices (splits, subsets): each one known, at least one given."""
    bad = [v for v in values if v not in choices]
    if bad:
        raise ValueError(f"unknown {what} {bad[0]!r}: choose from {', '.join(choices)}")
    if not values:
        raise ValueError(f"no {what}s: give at least one of " + ", ".join(choices))
    return values


def _decode_bound(name: str, default: int) -> int:
    """DecodeSpec's upper bound of a field, so that a job cannot ask for more than generation accepts."""
    info = DecodeSpec.model_fields.get(name)
    bounds = [m.le for m in (info.metadata if info else ()) if getattr(m, "le", None) is not None]
    return int(bounds[0]) if bounds else default


MAX_NEW_TOKENS = _decode_bound("max_new_tokens", 8192)
# a benchmark's label keys its results beside these fields of SystemResult / EvalResults
RESERVED_LABELS = frozenset({"name", "config", "decode", "systems", "data_files", "stats", "notes"})


class BenchmarkSpec(BaseModel):
    """A job's benchmark entry: ``kind`` picks the registered benchmark; ``name`` tells two benchmarks of
    one kind apart (e.g. POPE on two datasets) and prefixes their sample ids and statistics."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="label of this benchmark (default: its kind)")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, v: str | None) -> str | None:
        if v in RESERVED_LABELS:
            raise ValueError(f"{v!r} is a field of the results: choose another name")
        return v

    @property
    def label(self) -> str:
        return self.name or self.kind

    def check_in_job(self, job: EvalJob) -> str | None:
        """Why this entry cannot run in ``job`` (e.g. it needs another benchmark), or None."""
        return None


class DataFile(BaseModel):
    """Provenance of one data file: recorded in results.json (reference/evals.md section 6, point 1)."""

    path: str
    sha256: str
    n: int
    split: str | None = None
    layout: str | None = None

    @classmethod
    def from_file(cls, f: Any) -> DataFile:
        """From any loaded-file record with ``path``, ``sha256``, ``n``, ``split`` and ``layout``."""
        return cls(path=f.path, sha256=f.sha256, n=f.n, split=f.split, layout=f.layout)

    from_pope = from_file  # the name earlier releases used


@dataclass
class BenchmarkScore:
    """What scoring one benchmark gives the runner (all of it from cached outputs)."""

    per_system: dict[str, dict[str, Any]] = field(default_factory=dict)  # system -> {result key: result}
    measures: list[Measure] = field(default_factory=list)
    data_files: list[DataFile] = field(default_factory=list)
    fields: dict[str, Any] = field(default_factory=dict)  # results-level entries of results.json
    # metric name -> system -> value: what other benchmarks may correlate with (CrossCheck does)
    headline: dict[str, dict[str, float]] = field(default_factory=dict)


Lookup = Callable[["SystemSpec", "WorkItem"], "str | None"]


@dataclass
class ScoreContext:
    """What ``Benchmark.score`` may use: the job, cached outputs, the output folder, earlier scores."""

    job: EvalJob
    outputs: Callable[[SystemSpec, Sequence[WorkItem]], dict[str, str]]  # sample id -> text; raises if missing
    lookup: Lookup
    output_dir: Path
    scored: dict[str, BenchmarkScore] = field(default_factory=dict)  # by label, benchmarks scored before


class Benchmark(ABC):
    """One benchmark of a job (see the module docstring for its life in a run)."""

    kind: ClassVar[str]
    spec_class: ClassVar[type[BenchmarkSpec]]
    # scored after the others (it reads their outputs or scores, e.g. CrossCheck)
    depends_on_others: ClassVar[bool] = False
    order: ClassVar[int] = 100  # where the report lists this kind's sections (lower first)

    def __init__(self, spec: BenchmarkSpec, job: EvalJob) -> None:
        self.spec = spec
        self.job = job
        self.label = spec.label
        self.output_dir = Path(job.output)

    def prepare(self, others: Mapping[str, Benchmark]) -> None:  # noqa: B027 - optional hook
        """Load and check the data (one-line ``EvalInputError`` on bad input); write nothing."""

    def materialize(self) -> None:  # noqa: B027 - optional hook
        """Write what ``prepare`` found but must keep beside the results (called under the folder's lock)."""

    def items(self) -> list[WorkItem]:
        """First-round work: every system of the job generates each of these."""
        return []

    def external_ids(self) -> dict[str, WorkItem]:
        """The benchmark's own id of each first-round item (an image id, a question id), by which outputs
        generated elsewhere are matched to it (``clearsight eval score``); defaults to the sample ids."""
        return {it.sample_id: it for it in self.items()}

    def follow_up(self, round: int, lookup: Lookup) -> list[tuple[SystemSpec, WorkItem]]:
        """Round ``round`` (from 1) of work that depends on earlier outputs; [] when there is none."""
        return []

    def captions(self, outputs: Callable[[SystemSpec, Sequence[WorkItem]], dict[str, str]]
                 ) -> dict[str, dict[str, tuple[str, str | None]]] | None:
        """Free-form descriptions per system (sample key -> (text, image)) for benchmarks that score
        captions of another (CrossCheck); None for benchmarks without free-form outputs."""
        return None

    @abstractmethod
    def score(self, ctx: ScoreContext) -> BenchmarkScore:
        """Score every system of the job from cached outputs; pure (no model)."""

    # ------------------------------------------------------------------ report (whole results, all labels)
    @classmethod
    def render(cls, results: EvalResults) -> list[str]:
        """Markdown parts of this kind's section(s); [] when the results hold none."""
        return []

    @classmethod
    def plots(cls, results: EvalResults) -> dict[str, bytes]:
        """PNG bytes per file name."""
        return {}

    @classmethod
    def raw_columns(cls, results: EvalResults) -> list[Column]:
        """The figures of this kind that go into the shared ``figures.png`` (with CIs)."""
        return []

    @classmethod
    def verdict_reading(cls, significant: Sequence[Difference], measured: Sequence[Difference]) -> str | None:
        """A plain-words reading of one system's differences that this kind's metrics tell (for example "more
        yes to everything"), appended to its verdict line; None when they tell none. ``significant`` are the
        differences significant after correction, ``measured`` all of the system's. The verdict lists the
        significant ones in the order ``score`` gave its measures."""
        return None


_REGISTRY: dict[str, type[Benchmark]] = {}


def register_benchmark(cls: type[Benchmark]) -> type[Benchmark]:
    """Register a benchmark class under ``cls.kind`` (usable as a decorator). A kind belongs to one class; the
    same class defined again (a re-run script or notebook cell) replaces it."""
    kind = cls.spec_class.model_fields["kind"].default
    if kind != cls.kind:
        raise ValueError(f"{cls.__name__}: spec_class kind default {kind!r} differs from kind {cls.kind!r}")
    old = _REGISTRY.get(cls.kind)
    if old is not None and old is not cls and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
        raise ValueError(f"a benchmark of kind {cls.kind!r} is already registered ({old.__name__})")
    _REGISTRY[cls.kind] = cls
    return cls


def registered() -> dict[str, type[Benchmark]]:
    """Kind -> class of every registered benchmark, in registration order (the report's section order)."""
    import clearsight.evals.benchmarks  # noqa: F401 - registers the built-ins

    return dict(sorted(_REGISTRY.items(), key=lambda kv: kv[1].order))


def benchmark_class(kind: str) -> type[Benchmark]:
    classes = registered()
    if kind not in classes:
        raise EvalInputError(f"unknown benchmark kind {kind!r}: choose from {', '.join(classes)}")
    return classes[kind]


def result_keys(results: EvalResults, result_type: type) -> list[str]:
    """Per-system result keys holding ``result_type`` objects, in first-seen order."""
    keys: dict[str, None] = {}
    for s in results.systems:
        for k, v in (s.model_extra or {}).items():
            if isinstance(v, result_type):
                keys[k] = None
    return list(keys)


def forest_plots(results: EvalResults, result_type: type, kind: str,
                 columns: Callable[[str], list[Column]]) -> dict[str, bytes]:
    """One forest plot (``forest_<key>.png``) per result key holding ``result_type``, titled ``kind`` for the
    benchmark's default label and ``"<kind> <key>"`` for a named one; none without statistics."""
    from clearsight.evals.render import forest_png

    plots: dict[str, bytes] = {}
    if results.stats is None:
        return plots
    for key in result_keys(results, result_type):
        png = forest_png(results.stats, columns(key), kind if key == kind.lower() else f"{kind} {key}")
        if png is not None:
            plots[f"forest_{key}.png"] = png
    return plots
