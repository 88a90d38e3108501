"""MME's hallucination subsets as a benchmark: the official release folder, or MME-style pairs built from
the shapes world. Loader: ``clearsight.evals.datasets.mme``; answer rule and metrics:
``clearsight.evals.metrics.mme``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clearsight.evals.benchmarks.base import (
    MAX_NEW_TOKENS,
    Benchmark,
    BenchmarkScore,
    BenchmarkSpec,
    DataFile,
    ScoreContext,
    forest_plots,
    known_choices,
    register_benchmark,
    result_keys,
)
from clearsight.evals.benchmarks.pope import prompt_tag
from clearsight.evals.datasets.mme import MmeSubset, load_mme
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import WorkItem
from clearsight.evals.metrics.mme import SUBSETS, MmeResult, mme_measures, score_mme
from clearsight.evals.render import Column, fmt, stats_tables, table


class MmeBenchmark(BenchmarkSpec):
    """MME hallucination subsets: ``data = "builtin:shapes"`` or ``root`` = the official
    ``MME_Benchmark_release_version`` folder (``image_dir`` only when the images are elsewhere)."""

    kind: Literal["mme"] = "mme"
    data: str | None = "builtin:shapes"
    root: str | None = None
    image_dir: str | None = None
    subsets: list[str] = Field(default_factory=lambda: list(SUBSETS))
    prompt_suffix: str | None = Field(None, description="appended to each question on a new line (the official "
                                      "questions already end with 'Please answer yes or no.')")
    max_new_tokens: int = Field(8, ge=1, le=MAX_NEW_TOKENS)
    limit: int | None = Field(None, ge=1, description="images per subset (first N; each has its 2 questions)")
    seed: int = Field(0, description="shapes world only: seed of the generated pairs")

    @field_validator("subsets")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        return known_choices(v, SUBSETS, "subset")

    @model_validator(mode="after")
    def _source(self) -> MmeBenchmark:
        if not self.data and not self.root:
            raise ValueError("give data = 'builtin:shapes' or root = the MME_Benchmark_release_version folder")
        return self


@register_benchmark
class Mme(Benchmark):
    kind = "mme"
    order = 40
    spec_class = MmeBenchmark

    def __init__(self, spec: BenchmarkSpec, job: Any) -> None:
        super().__init__(spec, job)
        self.bench: MmeBenchmark = spec  # type: ignore[assignment]
        self.sets: dict[str, MmeSubset] = {}
        self._items: dict[str, list[WorkItem]] = {}

    def prepare(self, others: Mapping[str, Benchmark]) -> None:
        bench = self.bench
        if bench.root:
            self.sets = load_mme(bench.root, bench.subsets, bench.image_dir)
        else:
            from clearsight.evals.datasets.mme import shapes_mme_root
            from clearsight.evals.datasets.shapes import resolve_builtin

            world = resolve_builtin(bench.data or "builtin:shapes")
            root = shapes_mme_root(world.root, world.instances, bench.seed)
            self.sets = load_mme(root, bench.subsets, world.images_dir)
        for name, sub in self.sets.items():
            if bench.limit is not None:
                keep = list(dict.fromkeys(q.image for q in sub.questions))[: bench.limit]
                sub.questions = [q for q in sub.questions if q.image in set(keep)]
            items = []
            for i, q in enumerate(sub.questions):
                prompt = q.question if not bench.prompt_suffix else f"{q.question}\n{bench.prompt_suffix}"
                sid = f"{self.label}/{name}/{Path(q.image).stem}/{i % 2}/{prompt_tag(prompt)}"
                items.append(WorkItem(sid, prompt, str(sub.image_dir / q.image), bench.max_new_tokens))
            self._items[name] = items

    def items(self) -> list[WorkItem]:
        return [it for items in self._items.values() for it in items]

    def external_ids(self) -> dict[str, WorkItem]:
        """``subset/<image stem>/<0 or 1>`` (the image's first or second question, in file order)."""
        return {"/".join(it.sample_id.split("/")[1:4]): it for items in self._items.values() for it in items}

    def answers(self, outputs: Mapping[str, str]) -> dict[str, list[str]]:
        """Raw answers per subset in question order, from ``sample id -> text``."""
        missing = [it.sample_id for items in self._items.values() for it in items if it.sample_id not in outputs]
        if missing:
            raise EvalInputError(f"MME: no answer for {missing[0]!r} ({len(missing)} missing)")
        return {name: [outputs[it.sample_id] for it in items] for name, items in self._items.items()}

    def score(self, ctx: ScoreContext) -> BenchmarkScore:
        out = BenchmarkScore()
        for name, sub in self.sets.items():
            out.data_files.append(DataFile(path=sub.path, sha256=sub.sha256, n=len(sub.questions), split=name,
                                           layout="mme"))
        per_subset: dict[str, dict[str, list[str]]] = {name: {} for name in self.sets}
        for system in ctx.job.systems:
            answers = self.answers(ctx.outputs(system, self.items()))
            result = score_mme({n: s.questions for n, s in self.sets.items()}, answers)
            out.per_system.setdefault(system.label, {})[self.label] = result
            out.headline.setdefault(f"MME score ({self.label})", {})[system.label] = result.total
            for name in self.sets:
                per_subset[name][system.label] = answers[name]
        for name, sub in self.sets.items():
            out.measures += mme_measures(name, sub.questions, per_subset[name], benchmark=self.label)
        return out

    # ------------------------------------------------------------------ report
    @staticmethod
    def _columns(results: Any, key: str) -> list[Column]:
        subsets = [s for s in SUBSETS if any(s in x[key].subsets for x in results.systems
                                            if isinstance((x.model_extra or {}).get(key), MmeResult))]
        return [(key, m, s, f"{s} {h}") for s in subsets for m, h in (("accuracy", "acc"), ("accuracy_plus", "acc+"))]

    @classmethod
    def render(cls, results: Any) -> list[str]:
        parts: list[str] = []
        for key in result_keys(results, MmeResult):
            systems = [s for s in results.systems if isinstance((s.model_extra or {}).get(key), MmeResult)]
            subsets = [s for s in SUBSETS if any(s in x[key].subsets for x in systems)]
            header = ["system"] + [f"{s} {m}" for s in subsets for m in ("acc", "acc+", "score")] + ["total"]
            rows = []
            for s in systems:
                r: MmeResult = s[key]
                row = [s.name]
                for sub in subsets:
                    m = r.subsets.get(sub)
                    row += [fmt(m.accuracy, True), fmt(m.accuracy_plus, True), f"{m.score:.1f}"] if m else ["-"] * 3
                rows.append(row + [f"{r.total:.1f}"])
            title = "MME hallucination subsets" + ("" if key == "mme" else f" `{key}`")
            parts += [f"## {title} (score = acc + acc+, at most 200 per subset)", "", table(header, rows), ""]
            parts += stats_tables(results, cls._columns(results, key), "MME")
        return parts

    @classmethod
    def plots(cls, results: Any) -> dict[str, bytes]:
        return forest_plots(results, MmeResult, "MME", lambda key: cls._columns(results, key))

    @classmethod
    def raw_columns(cls, results: Any) -> list[Column]:
        return [c for key in result_keys(results, MmeResult) for c in cls._columns(results, key) if c[1] == "accuracy"]
