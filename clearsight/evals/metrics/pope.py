"""POPE metrics (reference/evals.md section 1.6): per split, mean F1 over splits and pooled; and the
per-question outcomes the statistics resample (``pope_measures``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel

from clearsight.evals.datasets.pope import PopeQuestion, PopeSet, check_split
from clearsight.evals.errors import EvalInputError
from clearsight.evals.parsers import Label, get_parser
from clearsight.evals.stats import Measure


class PopeMetrics(BaseModel):
    """Metrics of one split (reference/evals.md section 1.6), "yes" = positive class.

    Unparsed answers stay in N: they count as wrong for accuracy and as "not yes" for precision/recall
    (a gold-yes item left unparsed is a false negative), and their number is reported.
    """

    n: int
    tp: int
    fp: int
    tn: int
    fn: int
    unparsed: int
    accuracy: float
    precision: float
    recall: float
    f1: float
    yes_ratio: float


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def pope_metrics(labels: Sequence[Label], predictions: Sequence[Label | None]) -> PopeMetrics:
    """Accuracy, precision, recall, F1, yes-ratio (from predictions) and unparsed count."""
    if len(labels) != len(predictions):
        raise EvalInputError(f"pope_metrics: {len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise EvalInputError("pope_metrics: empty dataset; need at least one question")
    tp = fp = tn = fn = unparsed = 0
    for gold, pred in zip(labels, predictions):
        if pred is None:
            unparsed += 1
            fn += gold == "yes"  # an unparsed gold-yes is a miss; an unparsed gold-no is neither
        elif pred == "yes":
            tp += gold == "yes"
            fp += gold == "no"
        else:
            tn += gold == "no"
            fn += gold == "yes"
    n = len(labels)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return PopeMetrics(
        n=n, tp=tp, fp=fp, tn=tn, fn=fn, unparsed=unparsed, accuracy=(tp + tn) / n, precision=precision,
        recall=recall, f1=_div(2 * precision * recall, precision + recall),
        yes_ratio=sum(p == "yes" for p in predictions) / n,
    )


class PopeReport(BaseModel):
    """Per-split metrics, mean F1 over splits (LLaVA convention) and pooled metrics (VLMEvalKit)."""

    parser: str
    splits: dict[str, PopeMetrics]
    mean_f1: float
    pooled: PopeMetrics


def match_answers(questions: Sequence[PopeQuestion], answers: Mapping[Any, str], where: str = "answers"
                  ) -> list[str]:
    """Answers in question order; any missing or extra question id is a one-line error."""
    ids = [q.question_id for q in questions]
    missing = [i for i in ids if i not in answers]
    extra = set(answers) - set(ids)
    if missing or extra:
        first = missing[0] if missing else sorted(map(str, extra))[0]
        raise EvalInputError(f"{where}: question ids do not match the questions ({len(missing)} missing, "
                             f"{len(extra)} unknown; first: {first!r}); answer exactly the loaded questions")
    return [answers[i] for i in ids]


def score_pope(sets: Mapping[str, PopeSet] | Sequence[PopeSet],
               answers: Mapping[str, Mapping[Any, str]], parser: str = "pope") -> PopeReport:
    """Score raw answers. ``answers[split][question_id] = model output text``."""
    parse = get_parser(parser)
    set_list = list(sets.values()) if isinstance(sets, Mapping) else list(sets)
    if not set_list:
        raise EvalInputError("score_pope: no POPE splits given; load at least one split")
    per: dict[str, PopeMetrics] = {}
    all_labels: list[Label] = []
    all_preds: list[Label | None] = []
    for s in set_list:
        check_split(s.split)
        if s.split not in answers:
            raise EvalInputError(f"score_pope: no answers for split {s.split!r}; generate them first")
        if any(q.label is None for q in s.questions):
            raise EvalInputError(f"split {s.split!r} has questions without labels; pass label_files to "
                                 "load_llava_pope")
        texts = match_answers(s.questions, answers[s.split], where=f"answers for split {s.split!r}")
        labels = [q.label for q in s.questions]
        preds = [parse(t) for t in texts]
        per[s.split] = pope_metrics(labels, preds)  # type: ignore[arg-type]
        all_labels += labels  # type: ignore[arg-type]
        all_preds += preds
    return PopeReport(parser=parser, splits=per, mean_f1=sum(m.f1 for m in per.values()) / len(per),
                      pooled=pope_metrics(all_labels, all_preds))


def pope_measures(split: str, labels: Sequence[str], predictions: Mapping[str, Sequence[str | None]],
                  benchmark: str = "pope") -> list[Measure]:
    """Accuracy (proportion), F1 (ratio) and yes-rate (proportion) of one POPE split.

    Same conventions as ``pope_metrics``: an unparsed answer is wrong, and a miss when the gold is yes."""
    gold = np.array([x == "yes" for x in labels])
    acc, f1n, f1d, yes = {}, {}, {}, {}
    for name, preds in predictions.items():
        py = np.array([p == "yes" for p in preds])
        pn = np.array([p == "no" for p in preds])
        tp, fp, fn = gold & py, ~gold & py, gold & ~py
        acc[name] = ((gold & py) | (~gold & pn)).astype(float)
        f1n[name] = 2.0 * tp
        f1d[name] = 2.0 * tp + fp + fn
        yes[name] = py.astype(float)
    ones = {k: np.ones(len(gold)) for k in predictions}
    return [Measure(benchmark, "accuracy", split, "proportion", acc, ones, "accuracy", True),
            Measure(benchmark, "f1", split, "ratio", f1n, f1d, "F1", True),
            Measure(benchmark, "yes_ratio", split, "proportion", yes, ones, "yes-ratio", None)]
