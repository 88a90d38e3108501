"""Prior-driven hallucination on the shapes world: the absent partner of a present shape (issue 16).

The shapes world pairs shape types that co-occur (``PARTNER_PAIRS``); a model trained on it learns that
prior, and a hallucination that comes from it names the *absent partner of a present shape*. Two views:

- questions: for every scene where a paired shape is present and its partner absent (a "lone member"),
  one question about the absent partner (kind ``partner``, label no); per such scene one question about
  another absent shape that is nobody's partner in the scene (``control``, label no) and one about the
  lone member itself (``present``, label yes). The partner yes-rate against the control yes-rate is the
  prior's pull; the present yes-rate tells "more yes to the partner" from "more yes to everything".
- captions: the share of CHAIR's hallucinated mentions that are an absent partner of a present object.

The questions are a set of their own, beside the three official POPE splits (which keep the official
recipe), written in the official JSON-lines format plus ``kind``, ``object`` and ``member`` fields.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from clearsight.evals._io import atomic_write_text, require_file, sha256_file
from clearsight.evals.datasets.pope import (
    DEFAULT_TEMPLATE,
    PopeFile,
    PopeQuestion,
    question_text,
)
from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.pope import match_answers
from clearsight.evals.parsers import Label, get_parser
from clearsight.evals.stats import Measure

Kind = Literal["partner", "control", "present"]
KINDS: tuple[str, ...] = ("partner", "control", "present")


def partner_map(pairs: Sequence[Sequence[str]]) -> dict[str, str]:
    """Shape -> its partner, both ways.

    >>> partner_map([("square", "hourglass")])
    {'square': 'hourglass', 'hourglass': 'square'}
    """
    return {a: b for a, b in pairs} | {b: a for a, b in pairs}


def lone_members(objects: Sequence[str], partners: Mapping[str, str]) -> list[str]:
    """Present shapes whose partner is absent, in listed order (each once)."""
    present = set(objects)
    out: list[str] = []
    for o in objects:
        if o in partners and partners[o] not in present and o not in out:
            out.append(o)
    return out


def partner_mentions(hallucinated: Sequence[Sequence[str]], gt_objects: Sequence[str],
                     partners: Mapping[str, str]) -> int:
    """How many hallucinated mentions (``(word, category)`` as CHAIR lists them) name the absent partner
    of an object in the ground truth.

    >>> partner_mentions([("hourglass", "hourglass"), ("star", "star")], ["square", "ring"],
    ...                  partner_map([("square", "hourglass"), ("circle", "star")]))
    1
    """
    gt = set(gt_objects)
    return sum(1 for m in hallucinated if partners.get(m[1]) in gt and m[1] not in gt)


@dataclass(frozen=True)
class PartnerQuestion:
    question: PopeQuestion
    kind: Kind
    object: str
    member: str  # the present shape whose partner is asked about (partner / present), "" for control


def build_partner_questions(scenes: Sequence[Mapping[str, Any]], pairs: Sequence[Sequence[str]],
                            vocabulary: Sequence[str], seed: int = 0,
                            template: str = DEFAULT_TEMPLATE) -> list[PartnerQuestion]:
    """The partner question set of ``scenes`` (``{"image", "objects"}`` in listed order), seeded.

    Per scene with lone members: a partner question per lone member, then one control question (an
    absent shape, not the partner of a present one, drawn uniformly from ``vocabulary``), then one
    present question (the first lone member). Question ids run from 1 in that order.
    """
    partners = partner_map(pairs)
    rng = random.Random(f"{seed}:partner")
    out: list[PartnerQuestion] = []

    def add(image: str, obj: str, kind: Kind, member: str) -> None:
        label = "yes" if kind == "present" else "no"
        q = PopeQuestion(len(out) + 1, image, question_text(template, obj), label, "partner")  # type: ignore[arg-type]
        out.append(PartnerQuestion(q, kind, obj, member))

    for sc in scenes:
        objects = list(sc["objects"])
        lone = lone_members(objects, partners)
        if not lone:
            continue
        for m in lone:
            add(sc["image"], partners[m], "partner", m)
        excluded = set(objects) | {partners[o] for o in objects if o in partners}
        pool = [v for v in vocabulary if v not in excluded]
        if pool:
            add(sc["image"], rng.choice(pool), "control", "")
        add(sc["image"], lone[0], "present", lone[0])
    return out


def take_partner_questions(questions: Sequence[PartnerQuestion], n_partner: int) -> list[PartnerQuestion]:
    """Whole scenes, in order, until at least ``n_partner`` partner questions are included."""
    out: list[PartnerQuestion] = []
    count = 0
    last_image = None
    for q in questions:
        if count >= n_partner and q.question.image != last_image:
            break
        out.append(q)
        count += q.kind == "partner"
        last_image = q.question.image
    return out


def write_partner_file(path: str | os.PathLike[str], questions: Sequence[PartnerQuestion]) -> None:
    lines = [json.dumps({"question_id": q.question.question_id, "image": q.question.image, "text": q.question.text,
                         "label": q.question.label, "kind": q.kind, "object": q.object, "member": q.member})
             for q in questions]
    atomic_write_text(path, "\n".join(lines) + "\n")


def load_partner_file(path: str | os.PathLike[str]) -> tuple[list[PartnerQuestion], PopeFile]:
    """Read a file written by :func:`write_partner_file`; a record without ``kind`` is a one-line error."""
    p = require_file(path, "partner question file", "rebuild the shapes world (delete its cache folder)")
    out: list[PartnerQuestion] = []
    for i, line in enumerate(Path(p).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            q = PopeQuestion(r["question_id"], str(r["image"]), str(r["text"]), r["label"], "partner")
            kind = r["kind"]
            if kind not in KINDS or q.label not in ("yes", "no"):
                raise ValueError(kind)
            out.append(PartnerQuestion(q, kind, str(r["object"]), str(r.get("member", ""))))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise EvalInputError(f"{p}: line {i} is not a partner question (question_id, image, text, label, "
                                 f"kind in {', '.join(KINDS)}, object); rebuild the shapes world") from None
    if not out:
        raise EvalInputError(f"{p}: no partner questions; rebuild the shapes world")
    return out, PopeFile(str(p), sha256_file(p), len(out), "jsonl", "partner")


class PartnerResult(BaseModel):
    """Yes-rates of the partner question set per kind (partner / control / present)."""

    parser: str
    n: dict[str, int]
    yes: dict[str, int]
    yes_rate: dict[str, float]
    unparsed: int


def score_partner(questions: Sequence[PartnerQuestion], answers: Mapping[Any, str], parser: str = "pope"
                  ) -> tuple[PartnerResult, list[Label | None]]:
    """Parse the answers (``answers[question_id] = text``); returns the rates and the parsed answers in
    question order (an unparsed answer is not a yes)."""
    parse = get_parser(parser)
    texts = match_answers([q.question for q in questions], answers, where="answers for the partner questions")
    preds = [parse(t) for t in texts]
    n = {k: sum(q.kind == k for q in questions) for k in KINDS}
    yes = {k: sum(q.kind == k and p == "yes" for q, p in zip(questions, preds)) for k in KINDS}
    rates = {k: yes[k] / n[k] for k in KINDS if n[k]}
    return PartnerResult(parser=parser, n=n, yes=yes, yes_rate=rates,
                         unparsed=sum(p is None for p in preds)), preds


PARTNER_LABELS = {"partner": "partner yes-rate", "control": "other-absent yes-rate", "present": "present yes-rate"}


def partner_measures(kinds: Sequence[str], predictions: Mapping[str, Sequence[str | None]],
                     benchmark: str = "pope") -> list[Measure]:
    """Yes-rates of the partner question set, per kind (partner / control / present)."""
    out = []
    k = np.array(kinds)
    for kind, label in PARTNER_LABELS.items():
        mask = k == kind
        if not mask.any():
            continue
        yes = {name: np.array([p == "yes" for p in preds])[mask].astype(float) for name, preds in predictions.items()}
        ones = {name: np.ones(int(mask.sum())) for name in predictions}
        # an absent object should get "no", a present one "yes"
        out.append(Measure(benchmark, f"{kind}_yes", "partner", "proportion", yes, ones, label, kind == "present"))
    return out
