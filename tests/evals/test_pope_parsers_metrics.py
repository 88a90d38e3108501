"""POPE parsers against the table of reference/evals.md section 1.5, metrics against hand counts."""

import pytest

from clearsight.evals import EvalInputError, parse_negation, parse_pope, parse_strict, pope_metrics
from clearsight.evals.datasets.pope import PopeQuestion, PopeSet
from clearsight.evals.metrics.pope import match_answers, pope_measures, score_pope
from clearsight.evals.parsers import get_parser

# (output, POPE/LLaVA, OPERA-style "negation", lmms-eval-style "strict") from reference/evals.md 1.5.
TABLE = [
    ("Yes.", "yes", "yes", None),
    ("No, there is no cat in the image.", "no", "no", None),
    ("I don't see a cat.", "yes", "no", None),
    ("There is a dog, but no cat. Yes, a cat sits on the sofa.", "no", "no", None),
    ("NO", "yes", "no", "no"),
    ("I cannot tell; its eyes are closed.", "yes", "yes", None),
    ("Nothing like that appears.", "yes", "yes", None),
    ("Unknown", "yes", "yes", None),
    ("Yes, there is a cat and no dog.", "no", "no", None),
]


@pytest.mark.parametrize("text,pope,negation,strict", TABLE)
def test_parser_table(text, pope, negation, strict):
    assert parse_pope(text) == pope
    assert parse_negation(text) == negation
    assert parse_strict(text) == strict


def test_parser_extra_cases():
    # Official rule: only text before the first period counts.
    assert parse_pope("Yes. No.") == "yes"
    assert parse_negation("Yes. No.") == "no"
    assert parse_strict("  YES \n") == "yes"
    assert parse_strict("no") == "no"
    with pytest.raises(EvalInputError, match="unknown POPE parser 'vcd'"):
        get_parser("vcd")


def test_metrics_hand_computed():
    labels = ["yes", "yes", "yes", "yes", "no", "no", "no", "no", "yes", "no"]
    preds = ["yes", "yes", "no", None, "yes", "no", "no", None, "yes", "yes"]
    # TP = items 0,1,8 = 3; FN = item 2 + unparsed gold-yes item 3 = 2; FP = items 4,9 = 2; TN = 5,6 = 2
    m = pope_metrics(labels, preds)
    assert (m.tp, m.fn, m.fp, m.tn, m.unparsed, m.n) == (3, 2, 2, 2, 2, 10)
    assert m.accuracy == pytest.approx(5 / 10)
    assert m.precision == pytest.approx(3 / 5)
    assert m.recall == pytest.approx(3 / 5)
    assert m.f1 == pytest.approx(0.6)
    assert m.yes_ratio == pytest.approx(5 / 10)


def test_metrics_no_yes_predictions_is_zero_not_crash():
    m = pope_metrics(["yes", "no"], ["no", "no"])
    assert (m.precision, m.recall, m.f1, m.accuracy) == (0.0, 0.0, 0.0, 0.5)


def _set(split, labels):
    qs = [PopeQuestion(i + 1, f"im{i}.png", "q", lab, split) for i, lab in enumerate(labels)]
    return PopeSet(split, qs, [])


def test_score_pope_per_split_mean_and_pooled():
    sets = {"random": _set("random", ["yes", "no"]),
            "adversarial": _set("adversarial", ["yes", "no", "no", "yes"])}
    answers = {"random": {1: "Yes.", 2: "No."},  # perfect: F1 = 1
               "adversarial": {1: "Yes", 2: "Yes", 3: "no", 4: "No, there is not."}}
    rep = score_pope(sets, answers, parser="pope")
    # adversarial: TP=1 FP=1 TN=1 FN=1 -> P=R=F1=0.5
    assert rep.splits["random"].f1 == 1.0
    assert rep.splits["adversarial"].f1 == pytest.approx(0.5)
    assert rep.mean_f1 == pytest.approx(0.75)
    # pooled: TP=2 FP=1 TN=2 FN=1 -> P=R=2/3
    assert rep.pooled.f1 == pytest.approx(2 / 3)
    assert rep.pooled.n == 6
    assert rep.parser == "pope"


def test_score_pope_strict_reports_unparsed():
    rep = score_pope([_set("popular", ["yes", "no", "yes"])], {"popular": {1: "yes", 2: "Nope.", 3: "Yes."}},
                     parser="strict")
    m = rep.splits["popular"]
    assert m.unparsed == 2 and m.tp == 1 and m.fn == 1 and m.tn == 0 and m.fp == 0
    assert m.accuracy == pytest.approx(1 / 3)


def test_score_pope_mismatched_ids():
    with pytest.raises(EvalInputError, match="question ids do not match.*1 missing, 1 unknown"):
        score_pope([_set("random", ["yes", "no"])], {"random": {1: "yes", 7: "no"}})
    with pytest.raises(EvalInputError) as err:  # the default place named
        match_answers(_set("random", ["yes"]).questions, {})
    assert str(err.value) == ("answers: question ids do not match the questions (1 missing, 0 unknown; first: 1); "
                              "answer exactly the loaded questions")
    # only unknown ids: the first is the smallest (as text), none missing
    with pytest.raises(EvalInputError) as err:
        score_pope([_set("random", ["yes"])], {"random": {1: "yes", 9: "no", 10: "no"}})
    assert str(err.value) == ("answers for split 'random': question ids do not match the questions (0 missing, "
                              "2 unknown; first: '10'); answer exactly the loaded questions")


def test_score_pope_unknown_split_and_empty():
    with pytest.raises(EvalInputError, match="unknown POPE split 'easy'"):
        score_pope([_set("easy", ["yes"])], {"easy": {1: "yes"}})
    with pytest.raises(EvalInputError, match="empty dataset"):
        pope_metrics([], [])
    with pytest.raises(EvalInputError) as err:
        score_pope([], {})
    assert str(err.value) == "score_pope: no POPE splits given; load at least one split"


def test_metrics_asymmetric_counts_and_messages():
    """Metrics mutation survivors (docs/testing.md): the hand case above has as many "yes" as other
    predictions and one unparsed answer of each gold label, so these counts are made lopsided."""
    m = pope_metrics(["yes", "yes", "yes", "no", "no"], [None, None, "yes", None, "no"])
    assert (m.tp, m.fn, m.fp, m.tn, m.unparsed) == (1, 2, 0, 1, 3)  # the unparsed gold-yes are misses, gold-no not
    assert m.yes_ratio == pytest.approx(1 / 5)
    with pytest.raises(EvalInputError) as err:
        pope_metrics(["yes"], [])
    assert str(err.value) == "pope_metrics: 1 labels but 0 predictions"
    with pytest.raises(EvalInputError) as err:
        pope_metrics([], [])
    assert str(err.value) == "pope_metrics: empty dataset; need at least one question"
    with pytest.raises(EvalInputError) as err:
        score_pope([_set("random", ["yes"])], {})
    assert str(err.value) == "score_pope: no answers for split 'random'; generate them first"
    unlabeled = PopeSet("random", [PopeQuestion(1, "im.png", "q", None, "random")], [])
    with pytest.raises(EvalInputError) as err:
        score_pope([unlabeled], {"random": {1: "yes"}})
    assert str(err.value) == ("split 'random' has questions without labels; pass label_files to "
                              "load_llava_pope")
    with pytest.raises(EvalInputError, match="answers for split 'random'"):
        score_pope([_set("random", ["yes"])], {"random": {2: "yes"}})


def test_pope_measures_per_question_by_hand():
    """The per-question outcomes the statistics use (no runner), by hand: an unparsed answer is wrong, and a
    miss (FN) when the gold is yes; F1 per question is num 2 TP over den 2 TP + FP + FN."""
    labels = ["yes", "no", "yes", "no", "yes", "no"]
    preds = {"a": ["yes", "yes", None, "no", "no", None],  # TP, FP, unparsed (FN), TN, FN, unparsed (nothing)
             "b": ["no", "no", "yes", "yes", "yes", "yes"]}  # FN, TN, TP, FP, TP, FP
    got = [(m.benchmark, m.metric, m.split, m.kind, m.label, m.higher_is_better,
            {k: v.tolist() for k, v in m.num.items()}, {k: v.tolist() for k, v in m.den.items()})
           for m in pope_measures("adversarial", labels, preds)]
    ones = {"a": [1.0] * 6, "b": [1.0] * 6}
    assert got == [
        ("pope", "accuracy", "adversarial", "proportion", "accuracy", True,
         {"a": [1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "b": [0.0, 1.0, 1.0, 0.0, 1.0, 0.0]}, ones),
        ("pope", "f1", "adversarial", "ratio", "F1", True,
         {"a": [2.0, 0.0, 0.0, 0.0, 0.0, 0.0], "b": [0.0, 0.0, 2.0, 0.0, 2.0, 0.0]},
         {"a": [2.0, 1.0, 1.0, 0.0, 1.0, 0.0], "b": [1.0, 0.0, 2.0, 1.0, 2.0, 1.0]}),
        ("pope", "yes_ratio", "adversarial", "proportion", "yes-ratio", None,
         {"a": [1.0, 1.0, 0.0, 0.0, 0.0, 0.0], "b": [0.0, 0.0, 1.0, 1.0, 1.0, 1.0]}, ones),
    ]
    # summed, they are the split's figures: a has TP 1, FP 1, FN 2: F1 = 2 / (2 + 1 + 2) = 0.4
    f1 = got[1]
    assert sum(f1[6]["a"]) / sum(f1[7]["a"]) == pytest.approx(0.4)
    assert {m.benchmark for m in pope_measures("random", ["no"], {"a": ["no"]}, benchmark="shapes-pope")} == {
        "shapes-pope"}
