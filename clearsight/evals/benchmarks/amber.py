"""AMBER as a benchmark: the official files on disk, or AMBER-style queries built from the shapes world.
Loader: ``clearsight.evals.datasets.amber``; scorer (and where it can differ from the official one):
``clearsight.evals.metrics.amber``."""

from __future__ import annotations

from collections.abc import Mapping
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
    register_benchmark,
    result_keys,
)
from clearsight.evals.benchmarks.pope import prompt_tag
from clearsight.evals.datasets.amber import PARTS, AmberData, AmberQuery, load_amber
from clearsight.evals.executor import WorkItem
from clearsight.evals.metrics.amber import DISCRIMINATIVE_GROUPS, AmberResult, amber_measures, score_amber
from clearsight.evals.render import Column, fmt, stats_tables, table


class AmberBenchmark(BenchmarkSpec):
    """AMBER: ``data = "builtin:shapes"``, or ``root`` = the AMBER repository's ``data`` folder and
    ``image_dir`` = the AMBER images."""

    kind: Literal["amber"] = "amber"
    data: str | None = "builtin:shapes"
    root: str | None = None
    image_dir: str | None = None
    parts: list[str] = Field(default_factory=lambda: list(PARTS))
    parser: Literal["amber", "pope", "negation", "strict"] = Field(
        "amber", description="yes/no rule: amber = the official exact 'Yes' / 'No' match, or a POPE parser")
    prompt_suffix: str | None = Field(None, description="appended to each discriminative question on a new line")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description="generative part")
    discriminative_max_new_tokens: int = Field(8, ge=1, le=MAX_NEW_TOKENS)
    limit: int | None = Field(None, ge=1, description="queries per part (first N)")
    seed: int = Field(0, description="shapes world only: seed of the generated questions")

    @field_validator("parts")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [p for p in v if p not in PARTS]
        if bad or not v:
            raise ValueError(f"unknown part {bad[0]!r}: choose from {', '.join(PARTS)}" if bad else
                             "no parts: give generative, discriminative or both")
        return v

    @model_validator(mode="after")
    def _source(self) -> AmberBenchmark:
        if not self.data and not self.root:
            raise ValueError("give data = 'builtin:shapes', or root = the AMBER data folder and image_dir")
        return self


@register_benchmark
class Amber(Benchmark):
    kind = "amber"
    order = 50
    spec_class = AmberBenchmark

    def __init__(self, spec: BenchmarkSpec, job: Any) -> None:
        super().__init__(spec, job)
        self.bench: AmberBenchmark = spec  # type: ignore[assignment]
        self.data: AmberData | None = None
        self.queries: list[AmberQuery] = []
        self._items: list[WorkItem] = []

    def prepare(self, others: Mapping[str, Benchmark]) -> None:
        bench = self.bench
        if bench.root:
            self.data = load_amber(bench.root, bench.image_dir, bench.parts)
        else:
            from clearsight.evals.datasets.amber import shapes_amber_root
            from clearsight.evals.datasets.shapes import resolve_builtin
            from clearsight.evals.metrics.partner import partner_map

            world = resolve_builtin(bench.data or "builtin:shapes")
            root = shapes_amber_root(world.root, world.instances, partner_map(world.spec.partner_pairs), bench.seed)
            self.data = load_amber(root, world.images_dir, bench.parts)
        for part in bench.parts:
            qs = self.data.queries[part][: bench.limit] if bench.limit else self.data.queries[part]
            for q in qs:
                generative = self.data.annotations[q.id].type == "generative"
                prompt = q.query if generative or not bench.prompt_suffix else f"{q.query}\n{bench.prompt_suffix}"
                n = bench.max_new_tokens if generative else bench.discriminative_max_new_tokens
                self.queries.append(q)
                self._items.append(WorkItem(f"{self.label}/{q.id}/{prompt_tag(prompt)}", prompt,
                                            str(self.data.image_dir / q.image), n))

    def items(self) -> list[WorkItem]:
        return list(self._items)

    def external_ids(self) -> dict[str, WorkItem]:
        """AMBER's query id (as in its ``inference_data`` files)."""
        return {str(q.id): it for q, it in zip(self.queries, self._items)}

    def score(self, ctx: ScoreContext) -> BenchmarkScore:
        assert self.data is not None
        out = BenchmarkScore()
        for path, sha, n in self.data.files:
            out.data_files.append(DataFile(path=path, sha256=sha, n=n, layout="amber"))
        anns = [self.data.annotations[q.id] for q in self.queries]
        texts: dict[str, list[str]] = {}
        for system in ctx.job.systems:
            outs = ctx.outputs(system, self._items)
            texts[system.label] = [outs[it.sample_id] for it in self._items]
            res = score_amber(anns, texts[system.label], self.data.vocab, parser=self.bench.parser)
            out.per_system.setdefault(system.label, {})[self.label] = res
            if res.amber_score is not None:
                out.headline.setdefault(f"AMBER score ({self.label})", {})[system.label] = res.amber_score
        out.measures = amber_measures(anns, texts, self.data.vocab, self.bench.parser, benchmark=self.label)
        return out

    # ------------------------------------------------------------------ report
    @staticmethod
    def _columns(key: str) -> list[Column]:
        return [(key, "chair", "generative", "CHAIR"), (key, "hal", "generative", "Hal"),
                (key, "cover", "generative", "Cover"), (key, "accuracy", "discriminative", "disc. acc"),
                (key, "f1", "discriminative", "disc. F1")]

    @classmethod
    def render(cls, results: Any) -> list[str]:
        parts: list[str] = []
        for key in result_keys(results, AmberResult):
            systems = [s for s in results.systems if isinstance((s.model_extra or {}).get(key), AmberResult)]
            groups = [g for g in (*DISCRIMINATIVE_GROUPS, "all") if any(g in s[key].discriminative for s in systems)]
            header = ["system", "CHAIR", "Cover", "Hal", "Cog"] + [f"{g} acc / F1" for g in groups] + ["AMBER score"]
            rows = []
            for s in systems:
                r: AmberResult = s[key]
                g = r.generative
                row = [s.name] + ([fmt(g.chair, True), fmt(g.cover, True), fmt(g.hal, True), fmt(g.cog, True)]
                                  if g else ["-"] * 4)
                for grp in groups:
                    d = r.discriminative.get(grp)
                    row.append(f"{fmt(d.accuracy, True)} / {fmt(d.f1, True)}" if d else "-")
                rows.append(row + [fmt(r.amber_score, True)])
            title = "AMBER" if key == "amber" else f"AMBER `{key}`"
            parser = systems[0][key].parser
            parts += [f"## {title} (answers: `{parser}`; discriminative: \"No\" is the positive class)", "",
                      table(header, rows), "",
                      "Offline scorer: exact-word synonym matching and no POS tagger, where the official one uses "
                      "spaCy vectors and NLTK (docs/evals.md, AMBER).", ""]
            parts += stats_tables(results, cls._columns(key), title)
        return parts

    @classmethod
    def plots(cls, results: Any) -> dict[str, bytes]:
        return forest_plots(results, AmberResult, "AMBER", cls._columns)

    @classmethod
    def raw_columns(cls, results: Any) -> list[Column]:
        return [c for key in result_keys(results, AmberResult) for c in cls._columns(key)
                if c[1] in ("hal", "accuracy")]
