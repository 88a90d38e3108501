"""The prior-driven hallucination metrics (issue 16) on hand-built scenes and answers."""

from __future__ import annotations

import pytest

from clearsight.evals.errors import EvalInputError
from clearsight.evals.metrics.chair import chair_measures, compute_chair
from clearsight.evals.metrics.partner import (
    build_partner_questions,
    load_partner_file,
    lone_members,
    partner_map,
    partner_measures,
    partner_mentions,
    score_partner,
    take_partner_questions,
    write_partner_file,
)
from clearsight.evals.stats import StatsSettings, compute_stats

PAIRS = [("square", "hourglass"), ("ring", "diamond")]
VOCAB = ["square", "hourglass", "ring", "diamond", "star", "moon"]
SCENES = [
    {"image": "a.png", "objects": ["square", "ring", "star"]},  # two lone members: square, ring
    {"image": "b.png", "objects": ["square", "hourglass"]},  # a complete pair: no partner question
    {"image": "c.png", "objects": ["diamond", "moon"]},  # one lone member: diamond (ring absent)
]


def test_partner_questions_of_hand_built_scenes():
    qs = build_partner_questions(SCENES, PAIRS, VOCAB, seed=0)
    got = [(q.question.image, q.kind, q.object, q.question.label) for q in qs]
    assert [g for g in got if g[1] != "control"] == [
        ("a.png", "partner", "hourglass", "no"), ("a.png", "partner", "diamond", "no"),
        ("a.png", "present", "square", "yes"),
        ("c.png", "partner", "ring", "no"), ("c.png", "present", "diamond", "yes")]
    controls = {q.question.image: q.object for q in qs if q.kind == "control"}
    # a control is absent and nobody's partner in the scene: a.png has square, ring, star (+ hourglass,
    # diamond as partners) -> only moon; c.png has diamond, moon (+ ring) -> square, hourglass or star
    assert controls["a.png"] == "moon" and controls["c.png"] in {"square", "hourglass", "star"}
    assert [q.question.question_id for q in qs] == list(range(1, 8))
    assert qs[0].question.text == "Is there a hourglass in the image?"
    assert lone_members(["square", "hourglass"], partner_map(PAIRS)) == []
    # whole scenes until at least N partner questions
    assert len(take_partner_questions(qs, 1)) == 4 and len(take_partner_questions(qs, 3)) == 7


def test_partner_yes_rates_from_answers(tmp_path):
    qs = build_partner_questions(SCENES, PAIRS, VOCAB, seed=0)
    path = tmp_path / "partner.json"
    write_partner_file(path, qs)
    loaded, pfile = load_partner_file(path)
    assert loaded == qs and pfile.n == 7
    # a.png: yes to hourglass (partner), no to diamond, no to control, yes to square; c.png: yes, yes, yes
    answers = {1: "Yes.", 2: "No.", 3: "No", 4: "Yes", 5: "Yes", 6: "Yes", 7: "Yes"}
    res, preds = score_partner(loaded, answers)
    assert res.n == {"partner": 3, "control": 2, "present": 2}
    assert res.yes == {"partner": 2, "control": 1, "present": 2}
    assert res.yes_rate["partner"] == pytest.approx(2 / 3) and res.yes_rate["control"] == 0.5
    measures = {m.metric: m for m in partner_measures([q.kind for q in loaded], {"none": preds})}
    assert measures["partner_yes"].num["none"].tolist() == [1.0, 0.0, 1.0]
    assert measures["present_yes"].num["none"].tolist() == [1.0, 1.0]


def test_bad_partner_file_is_one_line(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"question_id": 1, "image": "a.png", "text": "q", "label": "no"}\n')
    with pytest.raises(EvalInputError, match="line 1 is not a partner question"):
        load_partner_file(bad)


def test_chair_partner_share_of_hallucinated_mentions():
    partners = partner_map(PAIRS)
    gt = {1: {"square", "star"}, 2: {"ring"}, 3: {"moon"}}
    caps = {1: "a square, an hourglass and a star.",  # hourglass: partner of the present square
            2: "a ring, a diamond and a moon.",  # diamond: partner; moon: another hallucination
            3: "a moon and a diamond."}  # diamond, but ring is absent: not a partner hallucination
    vocab_words = {"square": [], "hourglass": [], "ring": [], "diamond": [], "star": [], "moon": []}
    from clearsight.evals.metrics.chair import ChairVocabulary

    vocab = ChairVocabulary.model_validate({"name": "t", "categories": [{"name": k, "synonyms": v}
                                                                         for k, v in vocab_words.items()]})
    res = compute_chair(caps, gt, vocab)
    assert [partner_mentions(r["hallucinated"], r["gt_objects"], partners) for r in res.per_caption] == [1, 1, 0]
    ms = {m.metric: m for m in chair_measures({"none": res.per_caption, "x": res.per_caption}, partners)}
    share = ms["partner_share"]
    assert share.num["none"].sum() / share.den["none"].sum() == pytest.approx(2 / 4)
    assert ms["partner_captions"].num["none"].tolist() == [1.0, 1.0, 0.0]
    rep = compute_stats(list(ms.values()), ["none", "x"], "none", StatsSettings(resamples=200))
    assert rep.figure("none", "chair", "partner_share").estimate == pytest.approx(0.5)
    assert all(d.identical and not d.significant for d in rep.differences)


def test_take_partner_questions_edges():
    """Metrics mutation survivors (docs/testing.md): the questions themselves, a count reached exactly at a
    scene's end, and scenes whose first questions are not partner questions."""
    qs = build_partner_questions(SCENES, PAIRS, VOCAB, seed=0)
    assert take_partner_questions(qs, 1) == qs[:4]  # a.png whole
    assert take_partner_questions(qs, 2) == qs[:4]  # reached exactly at a.png's end: c.png is not taken
    assert take_partner_questions(qs[2:], 1) == qs[2:]  # a.png's present + control count nothing


def test_score_partner_names_the_answers_in_errors():
    qs = build_partner_questions(SCENES, PAIRS, VOCAB, seed=0)
    with pytest.raises(EvalInputError, match="answers for the partner questions"):
        score_partner(qs, {})


def test_partner_file_provenance_and_measure_fields(tmp_path):
    """Metrics mutation survivors (docs/testing.md): what a loaded partner file records, blank lines and a
    member-less record, a bad label, and every field of the partner measures."""
    import hashlib
    import json

    from clearsight.evals.datasets.pope import PopeFile
    from clearsight.evals.metrics.partner import PARTNER_LABELS

    qs = build_partner_questions(SCENES, PAIRS, VOCAB, seed=0)
    path = tmp_path / "partner.jsonl"
    write_partner_file(path, qs)
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    del record["member"]
    path.write_text("\n".join([json.dumps(record), "", *lines[1:]]) + "\n")  # a blank line is skipped
    loaded, pfile = load_partner_file(path)
    assert len(loaded) == 7 and loaded[0].member == "" and loaded[1:] == qs[1:]
    assert pfile == PopeFile(str(path), hashlib.sha256(path.read_bytes()).hexdigest(), 7, "jsonl", "partner")
    record["label"] = "maybe"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(EvalInputError, match="line 1 is not a partner question"):
        load_partner_file(path)
    path.write_text("\n")
    with pytest.raises(EvalInputError) as err:
        load_partner_file(path)
    assert str(err.value) == f"{path}: no partner questions; rebuild the shapes world"
    kinds = [q.kind for q in qs]
    preds = ["yes", "no", "no", "yes", "yes", "yes", "yes"]
    for m in partner_measures(kinds, {"a": preds}):
        kind = m.metric.removesuffix("_yes")
        n = kinds.count(kind)
        assert (m.benchmark, m.split, m.kind, m.label) == ("pope", "partner", "proportion", PARTNER_LABELS[kind])
        # an absent object (partner, control) should get "no": a lower yes-rate is better; a present one "yes"
        assert m.higher_is_better is {"partner": False, "control": False, "present": True}[kind]
        assert m.num["a"].dtype == float and m.den["a"].tolist() == [1.0] * n


def test_partner_seed_member_and_messages(tmp_path):
    """The control draw is seeded (default seed 0; another seed draws other controls), a control question
    has no member, measures for a kind after a missing one, the unparsed count and the messages in full."""
    many = [{"image": f"{i}.png", "objects": ["square"]} for i in range(30)]  # controls from 4 shapes each
    first = build_partner_questions(many, PAIRS, VOCAB, seed=0)
    controls = [q.object for q in first if q.kind == "control"]
    assert controls == [q.object for q in build_partner_questions(many, PAIRS, VOCAB) if q.kind == "control"]
    assert controls == [q.object for q in build_partner_questions(many, PAIRS, VOCAB, seed=0) if q.kind == "control"]
    assert controls != [q.object for q in build_partner_questions(many, PAIRS, VOCAB, seed=1) if q.kind == "control"]
    assert {q.member for q in first if q.kind == "control"} == {""}
    assert set(controls) == {"ring", "diamond", "star", "moon"}  # absent and nobody's partner, all drawn
    # no "partner" question: the control and present measures are still made
    assert [m.metric for m in partner_measures(["control", "present"], {"a": ["no", "yes"]})] == [
        "control_yes", "present_yes"]
    res, preds = score_partner(first[:3], {1: "Yes", 2: "Maybe", 3: "Perhaps"}, parser="strict")
    assert (res.unparsed, preds) == (2, ["yes", None, None])
    with pytest.raises(EvalInputError) as err:
        score_partner(first[:1], {2: "Yes"})
    assert str(err.value) == ("answers for the partner questions: question ids do not match the questions (1 missing, "
                              "1 unknown; first: 1); answer exactly the loaded questions")
    with pytest.raises(EvalInputError) as err:
        load_partner_file(tmp_path / "none.jsonl")
    assert str(err.value) == (f"partner question file not found: {tmp_path / 'none.jsonl'}; rebuild the shapes world "
                              "(delete its cache folder)")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1, "image": "a.png", "text": "q", "label": "no", "kind": "other", "object": "x"}\n')
    with pytest.raises(EvalInputError) as err:
        load_partner_file(bad)
    assert str(err.value) == (f"{bad}: line 1 is not a partner question (question_id, image, text, label, kind in "
                              "partner, control, present, object); rebuild the shapes world")
