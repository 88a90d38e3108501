"""MME's hallucination subsets (Fu et al. 2023, "MME: A Comprehensive Evaluation Benchmark for
Multimodal Large Language Models"): existence, count, position, color (reference/evals.md section 4).

Each image has two yes/no questions (one answered yes, one no). The official ``eval_tool/calculation.py``:

* answer rule: the output is lowercased; exactly ``yes`` / ``no`` is that answer; otherwise "yes" anywhere
  in its first 4 characters is yes, else "no" in its first 4 characters is no, else "other" (always wrong);
* accuracy = correct answers / questions; accuracy+ = images with both questions right / images;
* score = 100 x accuracy + 100 x accuracy+ (at most 200 per subset, 800 over the four).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel

from clearsight.evals.errors import EvalInputError
from clearsight.evals.stats import Measure

SUBSETS: tuple[str, ...] = ("existence", "count", "position", "color")
MmeAnswer = Literal["yes", "no", "other"]


def parse_mme(text: str) -> MmeAnswer:
    """The official MME answer rule (see the module docstring).

    >>> [parse_mme(t) for t in ("Yes", "No, there is not.", "There is no cat.", "nope", "Not sure")]
    ['yes', 'no', 'other', 'no', 'no']
    """
    t = text.lower()
    if t in ("yes", "no"):
        return t  # type: ignore[return-value]
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


class MmeQuestion(BaseModel):
    """One question of an MME subset: the image it is about, its text and its answer."""

    subset: str
    image: str  # file name, relative to the subset's image folder
    question: str
    answer: Literal["yes", "no"]


class MmeSubsetResult(BaseModel):
    n_questions: int
    n_images: int
    accuracy: float  # fraction, as every rate in results.json; the report shows percentages
    accuracy_plus: float
    score: float  # 100 * (accuracy + accuracy_plus), the official MME score of the subset
    other: int  # answers the official rule maps to "other"


class MmeResult(BaseModel):
    subsets: dict[str, MmeSubsetResult]
    total: float  # sum of the subset scores (at most 200 per subset)


def _pairs(questions: Sequence[MmeQuestion]) -> dict[str, list[int]]:
    """Question indices per image, in file order; the official tool takes each image's two lines together."""
    by_image: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_image.setdefault(q.image, []).append(i)
    bad = [img for img, idx in by_image.items() if len(idx) != 2]
    if bad:
        raise EvalInputError(f"MME {questions[by_image[bad[0]][0]].subset}: image {bad[0]!r} has "
                             f"{len(by_image[bad[0]])} questions; MME pairs exactly 2 per image (one yes, one no)")
    return by_image


def score_mme_subset(questions: Sequence[MmeQuestion], answers: Sequence[str]) -> MmeSubsetResult:
    """Accuracy, accuracy+ and score of one subset; ``answers[i]`` is the raw output for ``questions[i]``."""
    if len(questions) != len(answers):
        raise EvalInputError(f"score_mme_subset: {len(questions)} questions but {len(answers)} answers")
    if not questions:
        raise EvalInputError("score_mme_subset: no questions")
    preds = [parse_mme(a) for a in answers]
    right = [p == q.answer for p, q in zip(preds, questions)]
    pairs = _pairs(questions)
    acc = sum(right) / len(right)
    acc_plus = sum(all(right[i] for i in idx) for idx in pairs.values()) / len(pairs)
    return MmeSubsetResult(n_questions=len(questions), n_images=len(pairs), accuracy=acc, accuracy_plus=acc_plus,
                           score=100 * acc + 100 * acc_plus, other=sum(p == "other" for p in preds))


def score_mme(questions: Mapping[str, Sequence[MmeQuestion]], answers: Mapping[str, Sequence[str]]) -> MmeResult:
    """Every subset (``questions[subset]``, ``answers[subset]`` in the same order) and the total score."""
    subsets = {s: score_mme_subset(qs, answers[s]) for s, qs in questions.items()}
    return MmeResult(subsets=subsets, total=sum(r.score for r in subsets.values()))


def mme_measures(subset: str, questions: Sequence[MmeQuestion], answers: Mapping[str, Sequence[str]],
                 benchmark: str = "mme") -> list[Measure]:
    """Per-question accuracy (proportion) and per-image accuracy+ (proportion) of one subset, per system;
    the score is their sum, so its uncertainty follows from these two."""
    pairs = list(_pairs(questions).values())
    acc, plus = {}, {}
    for name, texts in answers.items():
        right = np.array([parse_mme(t) == q.answer for t, q in zip(texts, questions)], dtype=float)
        acc[name] = right
        plus[name] = np.array([float(all(right[i] for i in idx)) for idx in pairs])
    return [Measure(benchmark, "accuracy", subset, "proportion", acc, {k: np.ones(len(v)) for k, v in acc.items()},
                    "accuracy", True),
            Measure(benchmark, "accuracy_plus", subset, "proportion", plus,
                    {k: np.ones(len(v)) for k, v in plus.items()}, "accuracy+", True)]
