"""CrossCheck as a benchmark: ranks the job's systems by the captions of a captioning benchmark (CHAIR).

The explicit judge and the implicit check are generations: they run as a second round of work items
through the job's executor and are cached like every other output (the judge under its own system, the
implicit checks under each evidence system with greedy decoding), so scoring reads the cache only and
``clearsight report`` needs no model. The embedding scorer embeds at scoring time (not a generation).
Pure parts (splitting, aggregation, ranking, correlation): ``clearsight.evals.metrics.crosscheck``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from clearsight.evals.benchmarks.base import (
    Benchmark,
    BenchmarkScore,
    BenchmarkSpec,
    Lookup,
    ScoreContext,
    register_benchmark,
)
from clearsight.evals.errors import EvalInputError
from clearsight.evals.executor import WorkItem
from clearsight.evals.metrics.crosscheck import (
    IMPLICIT_PROMPT,
    JUDGE_PROMPT,
    Correlation,
    CrossCheckResult,
    EmbeddingScorer,
    PromptJudgeScorer,
    aggregate_sample,
    aggregate_system,
    correlate,
    crosscheck_explicit,
    implicit_answer_to_score,
    rank_systems,
    split_sentences,
)
from clearsight.evals.render import bar_png, fmt, table

if TYPE_CHECKING:
    from clearsight.evals.job import EvalJob, SystemSpec

ANSWER_TOKENS = 4  # the judge / implicit answers are one word (Yes / No)


class CrossCheckBenchmark(BenchmarkSpec):
    """CrossCheck over the systems' captions (of ``captions_from``): explicit (embedding / judge) or implicit."""

    kind: Literal["crosscheck"] = "crosscheck"
    scorer: Literal["embedding", "judge", "implicit"] = "embedding"
    judge_model: str | None = Field(None, description="model for the judge scorer (default: the first system's)")
    max_samples: int | None = Field(None, ge=1)
    captions_from: str | None = Field(None, description="label of the captioning benchmark whose outputs are "
                                      "checked (default: the job's first chair benchmark)")

    def check_in_job(self, job: EvalJob) -> str | None:
        labels = {b.label: b.kind for b in job.benchmarks}
        if self.captions_from is None and "chair" not in labels.values():
            return "crosscheck scores the CHAIR captions: add a chair benchmark"
        if self.captions_from is not None and self.captions_from not in labels:
            return f"crosscheck captions_from {self.captions_from!r} is not a benchmark of the job"
        if len(job.systems) < 2:
            return "crosscheck needs at least 2 systems"
        return None


def _tag(*parts: str | None) -> str:
    return hashlib.sha256("\0".join(p or "" for p in parts).encode()).hexdigest()[:16]


@register_benchmark
class CrossCheck(Benchmark):
    kind = "crosscheck"
    order = 30
    spec_class = CrossCheckBenchmark
    depends_on_others = True

    def __init__(self, spec: BenchmarkSpec, job: Any) -> None:
        super().__init__(spec, job)
        self.bench: CrossCheckBenchmark = spec  # type: ignore[assignment]

    def prepare(self, others: Mapping[str, Benchmark]) -> None:
        source = self.bench.captions_from or next(b.label for b in others.values() if b.kind == "chair")
        self.source = others[source]
        if self.source.captions(lambda s, items: {}) is None:
            raise EvalInputError(f"crosscheck captions_from {source!r}: that benchmark has no captions to check")

    # ------------------------------------------------------------------ the systems' captions
    def _outputs(self, lookup: Lookup) -> tuple[dict[str, dict[str, str]], dict[str, str | None]] | None:
        """system -> sample key -> caption, and sample key -> image; None while a caption is not cached."""
        missing = False

        def get(system: SystemSpec, items: list[WorkItem]) -> dict[str, str]:
            nonlocal missing
            got = {}
            for it in items:
                text = lookup(system, it)
                if text is None:
                    missing = True
                else:
                    got[it.sample_id] = text
            return got

        caps = self.source.captions(get)
        if missing or caps is None:
            return None
        keys = sorted(next(iter(caps.values())), key=_natural)
        if self.bench.max_samples:
            keys = keys[: self.bench.max_samples]
        texts = {name: {k: c[k][0] for k in keys} for name, c in caps.items()}
        images = {k: next(iter(caps.values()))[k][1] for k in keys}
        return texts, images

    def judge_system(self) -> SystemSpec:
        from clearsight.evals.job import SystemSpec

        return SystemSpec(name="crosscheck judge", model=self.bench.judge_model or self.job.systems[0].model)

    def evidence_system(self, system: SystemSpec) -> SystemSpec:
        """An evidence system for the implicit check: its model and mitigations, greedy (its sampling
        settings are for its captions), named apart so its records are not taken for its captions."""
        return system.model_copy(update={"name": f"{system.label} (crosscheck implicit)", "decode": {}})

    def _judge_items(self, texts: Mapping[str, Mapping[str, str]]) -> dict[str, WorkItem]:
        items: dict[str, WorkItem] = {}
        for target, outs in texts.items():
            for key, text in outs.items():
                for sentence in split_sentences(text):
                    for ev, ev_outs in texts.items():
                        if ev != target:
                            prompt = JUDGE_PROMPT.format(context=ev_outs[key], sentence=sentence)
                            items[prompt] = WorkItem(f"{self.label}/judge/{_tag(prompt)}", prompt, None, ANSWER_TOKENS)
        return items

    def _implicit_items(self, texts: Mapping[str, Mapping[str, str]], images: Mapping[str, str | None]
                        ) -> dict[tuple[str, str], WorkItem]:
        items: dict[tuple[str, str], WorkItem] = {}
        for outs in texts.values():
            for key, text in outs.items():
                for sentence in split_sentences(text):
                    prompt = IMPLICIT_PROMPT.format(sentence=sentence)
                    sid = f"{self.label}/implicit/{key}/{_tag(prompt, images[key])}"
                    items[(key, prompt)] = WorkItem(sid, prompt, images[key], ANSWER_TOKENS)
        return items

    def follow_up(self, round: int, lookup: Lookup) -> list[tuple[SystemSpec, WorkItem]]:
        if round != 1 or self.bench.scorer == "embedding":
            return []
        got = self._outputs(lookup)
        if got is None:
            raise EvalInputError(f"crosscheck: the captions of {self.source.label!r} are not all generated")
        texts, images = got
        if self.bench.scorer == "judge":
            judge = self.judge_system()
            return [(judge, it) for it in self._judge_items(texts).values()]
        items = list(self._implicit_items(texts, images).values())
        return [(self.evidence_system(s), it) for s in self.job.systems for it in items]

    # ------------------------------------------------------------------ score
    def score(self, ctx: ScoreContext) -> BenchmarkScore:
        got = self._outputs(ctx.lookup)
        if got is None:
            raise EvalInputError(f"crosscheck: some captions of {self.source.label!r} have no cached output; "
                                 "run the generation stage (clearsight eval run) first")
        texts, images = got
        bench = self.bench
        if bench.scorer == "embedding":
            from clearsight.evals.embedding import minilm_embed

            result = crosscheck_explicit(texts, EmbeddingScorer(minilm_embed, name="embedding:all-MiniLM-L6-v2"))
        elif bench.scorer == "judge":
            judge = self.judge_system()
            items = self._judge_items(texts)

            def ask(prompt: str) -> str:
                text = ctx.lookup(judge, items[prompt])
                if text is None:
                    raise EvalInputError("crosscheck: a judge answer has no cached output; run the job again")
                return text

            result = crosscheck_explicit(texts, PromptJudgeScorer(ask, name=f"judge:{judge.model}"))
        else:
            result = self._implicit(ctx, texts, images)
        out = BenchmarkScore()
        out.fields[self.label] = result
        corr = []
        for scored in ctx.scored.values():
            for name, ref in scored.headline.items():
                if len(ref) >= 2 and len(set(ref.values())) > 1 and len(set(result.scores.values())) > 1:
                    corr.append(correlate(result.scores, ref, name))
        key = "correlations" if self.label == "crosscheck" else f"{self.label}_correlations"
        out.fields[key] = corr
        return out

    def _implicit(self, ctx: ScoreContext, texts: Mapping[str, Mapping[str, str]],
                  images: Mapping[str, str | None]) -> CrossCheckResult:
        """Each evidence system is asked, with the image, whether the target sentence contains an error."""
        items = self._implicit_items(texts, images)
        evidence = [self.evidence_system(s) for s in self.job.systems if s.label in texts]
        scores, n_samples, n_sentences, skipped = {}, {}, {}, {}
        for name, outs in texts.items():
            sample_scores: dict[str, float | None] = {}
            for key, text in outs.items():
                per_sentence = []
                for sentence in split_sentences(text):
                    it = items[(key, IMPLICIT_PROMPT.format(sentence=sentence))]
                    answers = [ctx.lookup(ev, it) for ev in evidence]
                    if any(a is None for a in answers):
                        raise EvalInputError("crosscheck: an implicit check has no cached output; run the job again")
                    per_sentence.append([implicit_answer_to_score(a) for a in answers])  # type: ignore[arg-type]
                sample_scores[key] = aggregate_sample(per_sentence)
            scores[name] = aggregate_system(sample_scores)
            n_samples[name] = len(sample_scores)  # every sample, as the explicit result counts (skipped below)
            n_sentences[name] = sum(len(split_sentences(t)) for t in outs.values())
            skipped[name] = sum(v is None for v in sample_scores.values())
        return CrossCheckResult(scorer="implicit", scores=scores, ranking=rank_systems(scores), n_samples=n_samples,
                                n_sentences=n_sentences, skipped_samples=skipped)

    # ------------------------------------------------------------------ report
    @staticmethod
    def _found(results: Any) -> list[tuple[str, CrossCheckResult, list[Correlation]]]:
        out = []
        for key, value in (results.model_extra or {}).items():
            if isinstance(value, CrossCheckResult):
                corr = results.get("correlations" if key == "crosscheck" else f"{key}_correlations") or []
                out.append((key, value, [c for c in corr if isinstance(c, Correlation)]))
        return out

    @classmethod
    def render(cls, results: Any) -> list[str]:
        parts: list[str] = []
        for key, cc, corr in cls._found(results):
            rows = [[str(i + 1), s, fmt(cc.scores[s]), str(cc.n_sentences.get(s, 0))] for i, s in enumerate(cc.ranking)]
            title = "CrossCheck" if key == "crosscheck" else f"CrossCheck `{key}`"
            parts += [f"## {title} (scorer: `{cc.scorer}`, lower = less hallucination)", "",
                      table(["rank", "system", "score", "sentences"], rows), ""]
            if corr:
                rows = [[c.reference, fmt(c.pearson), fmt(c.spearman), str(len(c.systems))] for c in corr]
                parts += ["## Correlation with reference metrics", "",
                          table(["reference", "Pearson", "Spearman", "systems"], rows), ""]
        return parts

    @classmethod
    def plots(cls, results: Any) -> dict[str, bytes]:
        return {f"{key}.png": bar_png(f"CrossCheck ({cc.scorer})", cc.ranking,
                                      {"score": [cc.scores[s] for s in cc.ranking]}, "hallucination score")
                for key, cc, _ in cls._found(results)}


def _natural(key: str) -> tuple[int, Any]:
    """Numeric keys in numeric order (image ids), others after, as text."""
    return (0, int(key)) if key.isdigit() else (1, key)
