"""POPE as a benchmark: official / SEEM / lmms-lab parquet files or the shapes world (with its partner
question set, issue 16). Loaders: ``clearsight.evals.datasets.pope``; parsers: ``clearsight.evals.parsers``;
metrics: ``clearsight.evals.metrics.pope`` and ``clearsight.evals.metrics.partner``."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from clearsight.evals._io import atomic_write_bytes
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
from clearsight.evals.datasets.pope import (
    DEFAULT_PROMPT_SUFFIX,
    SPLITS,
    PopeFile,
    PopeSet,
    build_prompt,
    load_pope_file,
)
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import WorkItem
from clearsight.evals.metrics.partner import (
    PartnerQuestion,
    PartnerResult,
    load_partner_file,
    partner_measures,
    score_partner,
    take_partner_questions,
)
from clearsight.evals.metrics.pope import PopeReport, pope_measures, score_pope
from clearsight.evals.parsers import get_parser
from clearsight.evals.render import Column, fmt, forest_png, stats_tables, table
from clearsight.evals.stats import Difference

PARTNER_SET = "partner"


def prompt_tag(prompt: str) -> str:
    """A short hash of the prompt: part of a sample id, so a changed prompt is generated anew."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:10]


class PopeBenchmark(BenchmarkSpec):
    """POPE: ``data = "builtin:shapes"``; or ``files`` (split -> official/SEEM file) + ``image_dir``; or
    ``parquet`` (the lmms-lab/POPE files already on disk, images embedded)."""

    kind: Literal["pope"] = "pope"
    data: str | None = "builtin:shapes"
    files: dict[str, str] = Field(default_factory=dict)
    parquet: list[str] = Field(default_factory=list, description="lmms-lab/POPE *.parquet files on disk")
    image_dir: str | None = None
    splits: list[str] = Field(default_factory=lambda: list(SPLITS))
    parser: Literal["pope", "negation", "strict"] = "pope"
    prompt_suffix: str | None = DEFAULT_PROMPT_SUFFIX
    max_new_tokens: int = Field(16, ge=1, le=MAX_NEW_TOKENS)
    limit: int | None = Field(None, ge=1, description="questions per split (first N)")
    partner: int = Field(0, ge=0, description="shapes world only: at least this many questions about the absent "
                         "partner of a present shape (whole scenes, each with a control-absent and a present "
                         "question); 0 = none")

    @field_validator("splits")
    @classmethod
    def _known_splits(cls, v: list[str]) -> list[str]:
        return known_choices(v, SPLITS, "split")

    @model_validator(mode="after")
    def _source(self) -> PopeBenchmark:
        if self.files:
            missing = [s for s in self.splits if s not in self.files]
            if missing:
                raise ValueError(f"files: no file for split {missing[0]!r}; add it or drop it from splits")
        elif not self.data and not self.parquet:
            raise ValueError("give data = 'builtin:shapes', files = {split: path} or parquet = [paths]")
        if self.partner and (self.files or self.parquet or not self.data):
            raise ValueError("partner questions need a world that knows its partner pairs: use "
                             "data = 'builtin:shapes', or set partner = 0")
        return self


def partner_key(label: str) -> str:
    """Where a POPE benchmark's partner results go (``partner`` for the default label, as before)."""
    return PARTNER_SET if label == "pope" else f"{label}_{PARTNER_SET}"


@register_benchmark
class Pope(Benchmark):
    kind = "pope"
    order = 10
    spec_class = PopeBenchmark

    def __init__(self, spec: BenchmarkSpec, job: Any) -> None:
        super().__init__(spec, job)
        self.bench: PopeBenchmark = spec  # type: ignore[assignment]
        self.sets: dict[str, PopeSet] = {}
        self._items: list[WorkItem] = []
        self.where: dict[str, tuple[str, Any]] = {}  # sample id -> (split, question id)
        self.images: dict[Path, bytes] = {}  # parquet images, written by materialize
        self.partner: list[PartnerQuestion] = []
        self.partner_file: PopeFile | None = None

    # ------------------------------------------------------------------ prepare
    def prepare(self, others: Mapping[str, Benchmark]) -> None:
        bench = self.bench
        if bench.parquet and not bench.files:
            image_dir = self.output_dir / ("pope_images" if self.label == "pope" else f"{self.label}_images")
            self.sets, self.images = self._parquet_sets(image_dir)
            self._add_sets(image_dir)
            return
        if bench.files:
            self.sets = {s: load_pope_file(bench.files[s], split=s, image_dir=bench.image_dir) for s in bench.splits}
            self._add_sets(Path(bench.image_dir) if bench.image_dir else None)
            return
        from clearsight.evals.datasets.shapes import resolve_builtin

        world = resolve_builtin(bench.data or "builtin:shapes")
        self.sets = {s: load_pope_file(world.pope[s], split=s, image_dir=world.images_dir) for s in bench.splits}
        self._add_sets(world.images_dir)
        if bench.partner:
            self._add_partner(world.partner, world.images_dir)

    def _add_sets(self, image_dir: Path | None) -> None:
        bench = self.bench
        for split, pset in self.sets.items():
            if not pset.questions:
                raise EvalInputError(f"POPE split {split!r} has no questions: the file {pset.files[0].path} is empty")
            if bench.limit is not None:
                pset.questions = pset.questions[: bench.limit]
            for q in pset.questions:
                prompt = build_prompt(q.text, bench.prompt_suffix)
                sid = f"{self.label}/{split}/{q.question_id}/{prompt_tag(prompt)}"
                image = str(image_dir / q.image) if image_dir is not None else q.image
                self._items.append(WorkItem(sid, prompt, image, bench.max_new_tokens))
                self.where[sid] = (split, q.question_id)

    def _add_partner(self, path: Path, image_dir: Path) -> None:
        """The partner question set (issue 16): beside the official splits, under sample ids of its own."""
        bench = self.bench
        questions, pfile = load_partner_file(path)
        chosen = take_partner_questions(questions, bench.partner)
        have = sum(q.kind == "partner" for q in chosen)
        if have < bench.partner:
            raise EvalInputError(f"pope partner = {bench.partner} but the world holds only {have} partner "
                                 f"questions ({path}): lower partner")
        self.partner, self.partner_file = chosen, pfile
        for pq in chosen:
            q = pq.question
            prompt = build_prompt(q.text, bench.prompt_suffix)
            sid = f"{self.label}/{PARTNER_SET}/{q.question_id}/{prompt_tag(prompt)}"
            self._items.append(WorkItem(sid, prompt, str(image_dir / q.image), bench.max_new_tokens))
            self.where[sid] = (PARTNER_SET, q.question_id)

    def _parquet_sets(self, image_dir: Path) -> tuple[dict[str, PopeSet], dict[Path, bytes]]:
        """lmms-lab/POPE parquet: the embedded images are written once beside the results, named by image."""
        from clearsight.evals.datasets.pope import load_pope_parquet

        bench = self.bench
        loaded = load_pope_parquet(bench.parquet)
        missing = [s for s in bench.splits if s not in loaded]
        if missing:
            raise EvalInputError(f"parquet files {bench.parquet[0]}...: no questions of split {missing[0]!r}; "
                                 f"they hold {', '.join(sorted(loaded))}")
        images: dict[Path, bytes] = {}
        for s in bench.splits:
            for q in loaded[s].questions:
                if q.image_bytes is None:
                    raise EvalInputError(f"parquet question {q.question_id!r} has no embedded image bytes")
                images[image_dir / q.image] = q.image_bytes
        return {s: loaded[s] for s in bench.splits}, images

    def materialize(self) -> None:
        for target, data in self.images.items():
            if not target.exists():
                atomic_write_bytes(target, data)

    def items(self) -> list[WorkItem]:
        return list(self._items)

    def external_ids(self) -> dict[str, WorkItem]:
        """The question id (``split/question_id`` when ids repeat across the splits)."""
        qids = [str(self.where[it.sample_id][1]) for it in self._items]
        unique = len(set(qids)) == len(qids)
        return {(q if unique else f"{self.where[it.sample_id][0]}/{q}"): it for q, it in zip(qids, self._items)}

    # ------------------------------------------------------------------ score
    def score(self, ctx: ScoreContext) -> BenchmarkScore:
        out = BenchmarkScore()
        for pset in self.sets.values():
            out.data_files += [DataFile.from_file(f) for f in pset.files]
        if self.partner_file is not None:
            f = self.partner_file
            out.data_files.append(DataFile(path=f.path, sha256=f.sha256, n=len(self.partner), split=PARTNER_SET,
                                           layout=f.layout))
        parser = self.bench.parser
        parse = get_parser(parser)
        preds: dict[str, dict[str, list[Any]]] = {}  # split -> system -> parsed answers (question order)
        for system in ctx.job.systems:
            outs = ctx.outputs(system, self._items)
            answers: dict[str, dict[Any, str]] = {s: {} for s in [*self.sets, PARTNER_SET]}
            for sid, text in outs.items():
                split, qid = self.where[sid]
                answers[split][qid] = text
            partner_answers = answers.pop(PARTNER_SET)
            mine = out.per_system.setdefault(system.label, {})
            mine[self.label] = report = score_pope(self.sets, answers, parser=parser)
            out.headline.setdefault(f"{self.label} mean F1", {})[system.label] = report.mean_f1
            for split, pset in self.sets.items():
                preds.setdefault(split, {})[system.label] = [parse(answers[split][q.question_id])
                                                             for q in pset.questions]
            if self.partner:
                mine[partner_key(self.label)], preds.setdefault(PARTNER_SET, {})[system.label] = score_partner(
                    self.partner, partner_answers, parser=parser)
        # the verdict lists effects in this order: the prior-driven hallucination first, then the splits
        if self.partner:
            out.measures += partner_measures([q.kind for q in self.partner], preds[PARTNER_SET], benchmark=self.label)
        for split, pset in self.sets.items():
            out.measures += pope_measures(split, [q.label or "no" for q in pset.questions], preds[split],
                                          benchmark=self.label)
        out.fields[f"{self.label}_parser"] = parser
        return out

    # ------------------------------------------------------------------ report
    @staticmethod
    def _columns(results: Any, key: str) -> list[Column]:
        systems = [s for s in results.systems if isinstance((s.model_extra or {}).get(key), PopeReport)]
        splits = [sp for sp in SPLITS if any(sp in s[key].splits for s in systems)]
        return [(key, m, sp, f"{sp} {h}") for sp in splits for m, h in (("accuracy", "acc"), ("f1", "F1"))]

    @staticmethod
    def _partner_labels(results: Any) -> list[str]:
        labels: dict[str, None] = {}
        for key in result_keys(results, PartnerResult):
            labels["pope" if key == PARTNER_SET else key.removesuffix(f"_{PARTNER_SET}")] = None
        if results.stats is not None:
            labels.update({f.benchmark: None for f in results.stats.figures if f.split == PARTNER_SET})
        return list(labels)

    @staticmethod
    def _partner_columns(label: str) -> list[Column]:
        return [(label, "partner_yes", PARTNER_SET, "partner yes%"),
                (label, "control_yes", PARTNER_SET, "other-absent yes%"),
                (label, "present_yes", PARTNER_SET, "present yes%")]

    @classmethod
    def verdict_reading(cls, significant: Sequence[Difference], measured: Sequence[Difference]) -> str | None:
        """What the partner questions' yes-rates say together, when they tell one story."""
        kinds = ("partner_yes", "control_yes", "present_yes")
        was_measured = {d.metric for d in measured if d.split == PARTNER_SET}
        by = {d.metric: d for d in significant if d.split == PARTNER_SET and d.metric in kinds}
        up = {k: (d.estimate or 0) > 0 for k, d in by.items()}
        if len(by) == len(kinds) and all(up.values()):
            return "more yes to everything"
        if len(by) == len(kinds) and not any(up.values()):
            return "more no to everything"
        if "partner_yes" in by and not up["partner_yes"] and "present_yes" in was_measured and "present_yes" not in by:
            return "fewer yes to absent partners, not fewer to present shapes"
        if "partner_yes" in by and up["partner_yes"] and "control_yes" in was_measured and "control_yes" not in by:
            return "more yes to absent partners, not to other absent shapes"
        return None

    @classmethod
    def render(cls, results: Any) -> list[str]:
        parts: list[str] = []
        for key in result_keys(results, PopeReport):
            systems = [s for s in results.systems if isinstance((s.model_extra or {}).get(key), PopeReport)]
            splits = [sp for sp in SPLITS if any(sp in s[key].splits for s in systems)]
            header = ["system"] + [f"{sp} {m}" for sp in splits for m in ("acc", "F1", "yes%", "unparsed")]
            header += ["mean F1", "pooled F1"]
            rows = []
            for s in systems:
                rep: PopeReport = s[key]
                row = [s.name]
                for sp in splits:
                    m = rep.splits.get(sp)
                    row += ([fmt(m.accuracy, True), fmt(m.f1, True), fmt(m.yes_ratio, True), str(m.unparsed)]
                            if m else ["-"] * 4)
                rows.append(row + [fmt(rep.mean_f1, True), fmt(rep.pooled.f1, True)])
            parser = results.get(f"{key}_parser") or systems[0][key].parser
            title = "POPE" if key == "pope" else f"POPE `{key}`"
            parts += [f"## {title} (parser: `{parser}`)", "", table(header, rows), ""]
            parts += stats_tables(results, cls._columns(results, key), title)
        for label in cls._partner_labels(results):
            which = "" if label == "pope" else f" (`{label}`)"
            parts += [f"## Prior-driven hallucination: questions about the absent partner of a present shape{which}",
                      "", "Partner = the absent partner of a present shape (label no); other-absent = an absent "
                      "shape that is no present shape's partner (label no); present = the shape whose partner is "
                      "absent (label yes).", ""]
            parts += stats_tables(results, cls._partner_columns(label), "Partner questions")
        return parts

    @classmethod
    def plots(cls, results: Any) -> dict[str, bytes]:
        plots = forest_plots(results, PopeReport, "POPE", lambda key: cls._columns(results, key))
        if results.stats is None:
            return plots
        for label in cls._partner_labels(results):
            png = forest_png(results.stats, cls._partner_columns(label), "Partner questions")
            if png is not None:
                plots[f"forest_{partner_key(label)}.png"] = png
        return plots

    @classmethod
    def raw_columns(cls, results: Any) -> list[Column]:
        cols = [c for key in result_keys(results, PopeReport) for c in cls._columns(results, key)
                if c[1] == "accuracy"]
        return cols + [c for label in cls._partner_labels(results) for c in cls._partner_columns(label)]
