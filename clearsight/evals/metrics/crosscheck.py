"""Pure scoring parts of CrossCheck (Sun, Manakul et al., "CrossCheckGPT", arXiv 2405.13684).

CrossCheck ranks *systems* without references: a target system's output is split into sentences and each
sentence is checked against the outputs of other (evidence) systems for the same input (explicit) or
judged by the evidence models themselves (implicit). Aggregation follows the released scripts
(reference/evals.md 3.2): average over evidence systems (equal weights), then over sentences, then over
samples -> one hallucination score per system (higher = more hallucination); rank the systems; validate with
Pearson and Spearman correlation against a reference metric (POPE, CHAIR) for the same systems.

Model-backed scorers plug in through :class:`SentenceScorer`; this module needs no model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
from pydantic import BaseModel

from clearsight.evals.errors import EvalInputError

MIN_SENTENCE_TOKENS = 4  # sentences with <= 3 tokens are dropped (CrossCheckGPT scripts)
JUDGE_PROMPT = ("Context: {context}\nSentence: {sentence}\n"
                "Is the sentence supported by the context above? Answer Yes or No.\nAnswer:")
IMPLICIT_PROMPT = ("Here is a sentence describing this image: {sentence}\n"
                   "Does the sentence contain any error about the image? Answer YES or NO.")

_SENT_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str, min_tokens: int = MIN_SENTENCE_TOKENS) -> list[str]:
    """Split at ., ! or ? followed by whitespace; drop sentences with fewer than ``min_tokens`` tokens
    (tokens = whitespace words).

    This is *not* the reference's rule: CrossCheckGPT splits with spaCy's sentence segmenter and drops
    sentences of 3 or fewer spaCy tokens (punctuation counts as a token there). So abbreviations ("Dr.
    Smith"), decimals and quotes split differently, and a sentence of 3 words plus its period is kept by the
    reference and dropped here (docs/evals.md, CrossCheck: differences from the reference).
    """
    parts = [p.strip() for p in _SENT_END.split(text.strip()) if p.strip()]
    return [p for p in parts if len(p.split()) >= min_tokens]


def judge_answer_to_score(answer: str) -> float:
    """Explicit judge (SelfCheckGPT Prompt variant): Yes (supported) -> 0, No -> 1, anything else -> 0.5."""
    w = answer.strip().lower()
    if w.startswith("yes"):
        return 0.0
    if w.startswith("no"):
        return 1.0
    return 0.5


def implicit_answer_to_score(answer: str) -> float:
    """Implicit check ("does the sentence contain an error?"): YES -> 1, NO -> 0, anything else -> 0.5."""
    w = answer.strip().lower()
    if w.startswith("yes"):
        return 1.0
    if w.startswith("no"):
        return 0.0
    return 0.5


@runtime_checkable
class SentenceScorer(Protocol):
    """Scores target sentences against one evidence text: 0 = supported ... 1 = hallucinated."""

    name: str

    def score(self, sentences: Sequence[str], evidence: str) -> Sequence[float]: ...


class EmbeddingScorer:
    """1 - best cosine similarity between a sentence and any sentence of the evidence text.

    Like SelfCheckGPT's BERTScore variant (best match per sample, then 1 - similarity), with any
    sentence-embedding function ``embed(list[str]) -> (n, d) array``; the real model is wired in later.
    """

    def __init__(self, embed: Callable[[list[str]], Any], name: str = "embedding",
                 min_tokens: int = 1) -> None:
        self.embed = embed
        self.name = name
        self.min_tokens = min_tokens  # evidence sentences are not filtered by length by default
        # every sentence is target once and evidence for every other system: embed each text once
        self._vectors: dict[str, np.ndarray] = {}

    def _unit_vectors(self, texts: list[str]) -> np.ndarray:
        new = list(dict.fromkeys(t for t in texts if t not in self._vectors))
        if new:
            rows = _unit(np.asarray(self.embed(new), dtype=np.float64))
            if rows.shape[0] != len(new):
                raise EvalInputError(f"{self.name}: embed() returned {rows.shape[0]} rows for {len(new)} texts; "
                                     "it must return one row per text")
            self._vectors.update(zip(new, rows))
        return np.stack([self._vectors[t] for t in texts])

    def score(self, sentences: Sequence[str], evidence: str) -> list[float]:
        if not sentences:
            return []
        ev = split_sentences(evidence, self.min_tokens) or ([evidence] if evidence.strip() else [])
        if not ev:
            return [1.0] * len(sentences)  # empty evidence supports nothing
        a = self._unit_vectors(list(sentences))
        b = self._unit_vectors(ev)
        best = (a @ b.T).max(axis=1)
        return [float(x) for x in np.clip(1.0 - best, 0.0, 1.0)]


def _unit(x: np.ndarray) -> np.ndarray:
    if x.ndim != 2:
        raise EvalInputError(f"embed() must return a 2-D array, got shape {x.shape}")
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n == 0, 1.0, n)


class PromptJudgeScorer:
    """Explicit CrossCheck with a judge prompt, run by any text generator ``generate(prompt) -> str``."""

    def __init__(self, generate: Callable[[str], str], name: str = "judge",
                 template: str = JUDGE_PROMPT) -> None:
        self.generate = generate
        self.name = name
        self.template = template

    def score(self, sentences: Sequence[str], evidence: str) -> list[float]:
        return [judge_answer_to_score(self.generate(self.template.format(context=evidence, sentence=s)))
                for s in sentences]


# ------------------------------------------------------------------------------------ aggregation
def aggregate_sample(sentence_scores: Sequence[Sequence[float]]) -> float | None:
    """``sentence_scores[i][e]`` = score of sentence i against evidence system e.

    Mean over evidence systems per sentence, then mean over sentences. None if no sentence survived.
    """
    per_sentence = [float(np.mean(s)) for s in sentence_scores if len(s)]
    return float(np.mean(per_sentence)) if per_sentence else None


def aggregate_system(sample_scores: Mapping[Any, float | None]) -> float:
    """Mean over samples that have a score (samples without sentences are skipped)."""
    vals = [v for v in sample_scores.values() if v is not None]
    if not vals:
        raise EvalInputError("CrossCheck: no sample has a sentence of >= 4 tokens; nothing to score")
    return float(np.mean(vals))


class CrossCheckResult(BaseModel):
    scorer: str
    scores: dict[str, float]  # system -> hallucination score (higher = worse)
    ranking: list[str]  # best (least hallucination) first
    n_samples: dict[str, int]
    n_sentences: dict[str, int]
    skipped_samples: dict[str, int]


def crosscheck_explicit(outputs: Mapping[str, Mapping[Any, str]], scorer: SentenceScorer,
                        evidence_systems: Sequence[str] | None = None,
                        min_tokens: int = MIN_SENTENCE_TOKENS) -> CrossCheckResult:
    """Explicit CrossCheck over cached outputs ``outputs[system][sample_id] = text``.

    Each system is scored against every *other* evidence system (all systems by default) on the samples
    they share; every system must have output for the same samples.
    """
    if len(outputs) < 2:
        raise EvalInputError("CrossCheck needs outputs of at least 2 systems on the same samples")
    systems = list(outputs)
    evidence = list(evidence_systems) if evidence_systems is not None else systems
    unknown = [e for e in evidence if e not in outputs]
    if unknown:
        raise EvalInputError(f"CrossCheck: evidence system {unknown[0]!r} has no outputs; cache them first")
    ids = set(outputs[systems[0]])
    for s in systems[1:]:
        if set(outputs[s]) != ids:
            diff = sorted(map(str, ids ^ set(outputs[s])))
            raise EvalInputError(f"CrossCheck: systems {systems[0]!r} and {s!r} cover different samples "
                                 f"(first differing id: {diff[0]}); generate the same samples for all "
                                 "systems")
    if not ids:
        raise EvalInputError("CrossCheck: empty dataset; no samples in the outputs")
    scores, n_sent, skipped = {}, {}, {}
    for target in systems:
        ev = [e for e in evidence if e != target]
        if not ev:
            raise EvalInputError(f"CrossCheck: no evidence system other than {target!r}")
        per_sample: dict[Any, float | None] = {}
        n_sent[target] = 0
        for sid in outputs[target]:
            sents = split_sentences(outputs[target][sid], min_tokens)
            n_sent[target] += len(sents)
            if not sents:
                per_sample[sid] = None
                continue
            cols = [list(scorer.score(sents, outputs[e][sid])) for e in ev]  # [evidence][sentence]
            per_sample[sid] = aggregate_sample([list(row) for row in zip(*cols)])
        skipped[target] = sum(v is None for v in per_sample.values())
        scores[target] = aggregate_system(per_sample)
    return CrossCheckResult(scorer=scorer.name, scores=scores, ranking=rank_systems(scores),
                            n_samples={s: len(ids) for s in systems}, n_sentences=n_sent,
                            skipped_samples=skipped)


def rank_systems(scores: Mapping[str, float], higher_is_better: bool = False) -> list[str]:
    """Systems best first (lowest hallucination score unless ``higher_is_better``); ties by name."""
    sign = -1.0 if higher_is_better else 1.0
    return sorted(scores, key=lambda s: (sign * scores[s], s))


# ------------------------------------------------------------------------------------ correlation
def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation coefficient (numpy; scipy is not a dependency). NaN if a side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size < 2:
        raise EvalInputError(f"pearson: need two equal-length sequences of >= 2 values, got {a.size} and "
                             f"{b.size}")
    a, b = a - a.mean(), b - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den else float("nan")


def rankdata(x: Sequence[float]) -> np.ndarray:
    """1-based ranks with ties given their average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(x, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(a.size, dtype=np.float64)
    i = 0
    while i < a.size:
        j = i
        while j + 1 < a.size and a[order[j + 1]] == a[order[i]]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation = Pearson correlation of the (tie-averaged) ranks."""
    return pearson(rankdata(x), rankdata(y))


class Correlation(BaseModel):
    reference: str
    systems: list[str]
    pearson: float
    spearman: float


def correlate(scores: Mapping[str, float], reference: Mapping[str, float], name: str = "reference"
              ) -> Correlation:
    """Correlation between CrossCheck scores and a reference metric over the systems both have.

    Sign convention is left to the caller: CrossCheck scores rise with hallucination, so they should
    correlate positively with CHAIR and negatively with POPE F1.
    """
    common = [s for s in scores if s in reference]
    if len(common) < 2:
        raise EvalInputError(f"correlate: only {len(common)} system(s) have both scores and {name}; "
                             "need >= 2")
    x = [scores[s] for s in common]
    y = [reference[s] for s in common]
    return Correlation(reference=name, systems=common, pearson=pearson(x, y), spearman=spearman(x, y))
