"""AMBER (Wang et al. 2023, "AMBER: An LLM-free Multi-dimensional Benchmark for MLLMs Hallucination
Evaluation"; ``junyangwang0410/AMBER``), scored as its official ``inference.py`` does, offline.

Generative part (a description per image; ``truth`` = annotated objects, ``hallu`` = objects a model is
likely to hallucinate). The response's nouns that are in AMBER's object vocabulary (every key and value of
``relation.json``) are checked in order: a global safe word (``safe_words.txt``) is neither hallucinated nor
covering anything; a word that is a truth object or one of its associated words covers that truth object;
otherwise a word that is a hallu object or one of its associated words covers that hallu object, and the
word is hallucinated. Then, over the responses:

* CHAIR = hallucinated words / vocabulary words (repeats count);
* Cover = covered truth objects / truth objects;
* Hal = responses with at least one hallucinated word / responses;
* Cog = covered hallu objects / hallu objects.

Discriminative part (yes/no): existence (``discriminative-hallucination``), attribute (``-attribute-state``,
``-number``, ``-action``) and relation; **"No" is the positive class**: precision = right "No" / "No"
answers, recall = right "No" / questions whose truth is no. The official answer rule is an exact string
match: the answer must be ``Yes`` or ``No`` exactly (anything else is wrong and neither yes nor no).

AMBER score = ((1 - CHAIR) + F1) / 2, with F1 of the whole discriminative part.

Where the result can differ from the official scorer (docs/evals.md, "AMBER"):

1. noun extraction: the official code keeps NLTK ``pos_tag`` nouns (``NN*``) lemmatized by WordNet; offline
   we keep every token that is in the vocabulary after singularising it with ``inflect``, so a vocabulary
   word used as a verb or adjective ("the dog *tables* the motion", "an *orange* shirt") counts here where
   the tagger may drop it, and irregular plurals may lemmatize differently (inflect: people -> person;
   WordNet: people -> people). Tokens keep their case, as in the official code (a capitalised "Dog" is not
   the vocabulary word "dog" there either);
2. synonyms: the official code also counts a word as a truth object (or hallu object) when its spaCy
   ``en_core_web_lg`` vector has cosine similarity > 0.8 with one; without those vectors we match exact
   words only, so a near-synonym that is not listed in ``relation.json`` is hallucinated here (CHAIR and
   Hal can be higher, Cover and Cog lower than the official figures);
3. arithmetic: the official counters start at 0.001 (to avoid dividing by zero) and round P, R and each
   figure to 0.1 before combining them; we report exact ratios.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field

from clearsight.evals._inflect import inflect_engine
from clearsight.evals.errors import EvalInputError
from clearsight.evals.stats import Measure

GROUPS: dict[str, str] = {
    "discriminative-hallucination": "existence",
    "discriminative-attribute-state": "attribute",
    "discriminative-attribute-number": "attribute",
    "discriminative-attribute-action": "attribute",
}  # anything else discriminative: relation (as the official scorer's last branch)
DISCRIMINATIVE_GROUPS: tuple[str, ...] = ("existence", "attribute", "relation")
_TOKEN_RE = re.compile(r"[A-Za-z0-9]+(?:[-'][A-Za-z0-9]+)*|[^\sA-Za-z0-9]")


def group_of(kind: str) -> str:
    return GROUPS.get(kind, "relation")


class AmberAnnotation(BaseModel):
    """One entry of ``annotations.json`` (its list index is ``id - 1``)."""

    id: int
    type: str
    truth: list[str] | Literal["yes", "no"]
    hallu: list[str] = Field(default_factory=list)


class AmberVocabulary:
    """``relation.json`` (object -> associated words) and ``safe_words.txt``."""

    def __init__(self, association: Mapping[str, Sequence[str]], safe_words: Sequence[str] = ()) -> None:
        self.association = {k: list(v) for k, v in association.items()}
        self.words = set(self.association) | {w for v in self.association.values() for w in v}
        self.safe = set(safe_words)

    def nouns(self, text: str) -> list[str]:
        """The response's vocabulary words in order, singularised (see the module docstring, point 1)."""
        out = []
        for tok in _TOKEN_RE.findall(text):
            if tok in self.words:
                out.append(tok)
                continue
            single = inflect_engine().singular_noun(tok) if tok.isalpha() else False
            if single and single in self.words:
                out.append(single)
        return out

    def check(self, text: str, truth: Sequence[str], hallu: Sequence[str]) -> tuple[list[str], list[bool],
                                                                                  list[bool], list[bool]]:
        """(vocabulary words, hallucinated flag per word, covered flag per truth object, per hallu object)."""
        truth_of = _first_owner(truth, self.association)
        hallu_of = _first_owner(hallu, self.association)
        words = self.nouns(text)
        flags, truth_cov, hallu_cov = [], [False] * len(truth), [False] * len(hallu)
        for w in words:
            if w in self.safe:
                flags.append(False)
                continue
            if w in truth_of:
                truth_cov[truth_of[w]] = True
                flags.append(False)
                continue
            if w in hallu_of:
                hallu_cov[hallu_of[w]] = True
            flags.append(True)
        return words, flags, truth_cov, hallu_cov


def _first_owner(objects: Sequence[str], association: Mapping[str, Sequence[str]]) -> dict[str, int]:
    """Word -> index of the object it covers, the first match winning in the official order: all associated
    words (object by object), then the objects themselves."""
    owner: dict[str, int] = {}
    for i, obj in enumerate(objects):
        for w in association.get(obj, []):
            owner.setdefault(w, i)
    for i, obj in enumerate(objects):
        owner.setdefault(obj, i)
    return owner


def parse_amber(text: str) -> Literal["yes", "no"] | None:
    """The official rule: exactly ``Yes`` or ``No``; anything else is neither."""
    return "yes" if text == "Yes" else "no" if text == "No" else None


class AmberGenerative(BaseModel):
    n: int
    chair: float
    cover: float
    hal: float
    cog: float
    per_response: list[dict] = Field(default_factory=list)  # id, words, hallucinated words


class AmberDiscriminative(BaseModel):
    n: int
    accuracy: float
    precision: float  # "No" is the positive class
    recall: float
    f1: float
    unparsed: int


class AmberResult(BaseModel):
    parser: str
    generative: AmberGenerative | None = None
    discriminative: dict[str, AmberDiscriminative] = Field(default_factory=dict)  # group and "all"
    amber_score: float | None = None  # ((1 - CHAIR) + F1) / 2


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def score_generative(annotations: Sequence[AmberAnnotation], texts: Sequence[str], vocab: AmberVocabulary
                     ) -> AmberGenerative:
    if len(annotations) != len(texts):
        raise EvalInputError(f"AMBER: {len(annotations)} generative queries but {len(texts)} responses")
    if not annotations:
        raise EvalInputError("AMBER: no generative queries to score")
    hal_words = n_words = covered = n_truth = cog = n_hallu = with_hal = 0
    rows = []
    for a, t in zip(annotations, texts):
        truth = list(a.truth) if isinstance(a.truth, list) else []
        words, flags, tc, hc = vocab.check(t, truth, a.hallu)
        hal_words += sum(flags)
        n_words += len(flags)
        covered += sum(tc)
        n_truth += len(tc)
        cog += sum(hc)
        n_hallu += len(hc)
        with_hal += any(flags)
        rows.append({"id": a.id, "words": words, "hallucinated": [w for w, f in zip(words, flags) if f],
                     "truth_covered": sum(tc), "truth": len(tc), "hallu_covered": sum(hc), "hallu": len(hc)})
    return AmberGenerative(n=len(texts), chair=_div(hal_words, n_words), cover=_div(covered, n_truth),
                           hal=with_hal / len(texts), cog=_div(cog, n_hallu), per_response=rows)


def discriminative_metrics(truths: Sequence[str], preds: Sequence[str | None]) -> AmberDiscriminative:
    """Accuracy and precision / recall / F1 with "No" as the positive class."""
    n = len(truths)
    right = sum(p == t for p, t in zip(preds, truths))
    said_no = sum(p == "no" for p in preds)
    truth_no = sum(t == "no" for t in truths)
    hit = sum(p == "no" and t == "no" for p, t in zip(preds, truths))
    precision, recall = _div(hit, said_no), _div(hit, truth_no)
    return AmberDiscriminative(n=n, accuracy=_div(right, n), precision=precision, recall=recall,
                               f1=_div(2 * precision * recall, precision + recall),
                               unparsed=sum(p is None for p in preds))


def score_amber(annotations: Sequence[AmberAnnotation], texts: Sequence[str], vocab: AmberVocabulary,
                parser: str = "amber") -> AmberResult:
    """Both parts from the annotations of the answered queries and the raw responses (same order)."""
    parse = answer_parser(parser)
    gen = [(a, t) for a, t in zip(annotations, texts) if a.type == "generative"]
    dis = [(a, t) for a, t in zip(annotations, texts) if a.type != "generative"]
    res = AmberResult(parser=parser)
    if gen:
        res.generative = score_generative([a for a, _ in gen], [t for _, t in gen], vocab)
    if dis:
        truths = [str(a.truth) for a, _ in dis]
        preds = [parse(t) for _, t in dis]
        groups = [group_of(a.type) for a, _ in dis]
        for g in DISCRIMINATIVE_GROUPS:
            idx = [i for i, x in enumerate(groups) if x == g]
            if idx:
                res.discriminative[g] = discriminative_metrics([truths[i] for i in idx], [preds[i] for i in idx])
        res.discriminative["all"] = discriminative_metrics(truths, preds)
    if res.generative is not None and dis:
        res.amber_score = ((1 - res.generative.chair) + res.discriminative["all"].f1) / 2
    return res


def answer_parser(name: str):
    """``amber`` (the official exact match) or one of the POPE parsers (``clearsight.evals.parsers``)."""
    if name == "amber":
        return parse_amber
    from clearsight.evals.parsers import get_parser

    return get_parser(name)


def amber_measures(annotations: Sequence[AmberAnnotation], texts: Mapping[str, Sequence[str]],
                   vocab: AmberVocabulary, parser: str = "amber", benchmark: str = "amber") -> list[Measure]:
    """Per-sample outcomes for the statistics: CHAIR (hallucinated / vocabulary words per response), Hal
    (a response with any), Cover; discriminative accuracy and F1 ("No" positive: num 2 TP, den 2 TP + FP + FN)."""
    parse = answer_parser(parser)
    gi = [i for i, a in enumerate(annotations) if a.type == "generative"]
    di = [i for i, a in enumerate(annotations) if a.type != "generative"]
    out: list[Measure] = []
    if gi:
        ch_n, ch_d, hal, cov_n, cov_d = {}, {}, {}, {}, {}
        for name, ts in texts.items():
            checks = []
            for i in gi:
                a = annotations[i]
                checks.append(vocab.check(ts[i], list(a.truth) if isinstance(a.truth, list) else [], a.hallu))
            ch_n[name] = np.array([sum(c[1]) for c in checks], dtype=float)
            ch_d[name] = np.array([len(c[1]) for c in checks], dtype=float)
            hal[name] = np.array([float(any(c[1])) for c in checks])
            cov_n[name] = np.array([sum(c[2]) for c in checks], dtype=float)
            cov_d[name] = np.array([len(c[2]) for c in checks], dtype=float)
        ones = {k: np.ones(len(gi)) for k in texts}
        out += [Measure(benchmark, "chair", "generative", "ratio", ch_n, ch_d, "AMBER CHAIR", False),
                Measure(benchmark, "hal", "generative", "proportion", hal, ones, "Hal", False),
                Measure(benchmark, "cover", "generative", "ratio", cov_n, cov_d, "Cover", True)]
    if di:
        truth = np.array([annotations[i].truth == "no" for i in di])
        acc, f1n, f1d = {}, {}, {}
        for name, ts in texts.items():
            preds = [parse(ts[i]) for i in di]
            pn = np.array([p == "no" for p in preds])
            py = np.array([p == "yes" for p in preds])
            acc[name] = ((truth & pn) | (~truth & py)).astype(float)
            tp, fp, fn = truth & pn, ~truth & pn, truth & ~pn
            f1n[name] = 2.0 * tp
            f1d[name] = 2.0 * tp + fp + fn
        ones = {k: np.ones(len(di)) for k in texts}
        out += [Measure(benchmark, "accuracy", "discriminative", "proportion", acc, ones, "accuracy", True),
                Measure(benchmark, "f1", "discriminative", "ratio", f1n, f1d, "F1 (No positive)", True)]
    return out
