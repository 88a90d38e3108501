"""AMBER on hand-made files in the official format, against scores computed by hand (comments), through
the runner with no model (outputs given as AMBER ids + text); and the shapes-world AMBER-style files."""

from __future__ import annotations

import json

import pytest

from clearsight.evals.datasets.amber import build_shapes_amber, load_amber
from clearsight.evals.errors import EvalInputError
from clearsight.evals.job import parse_job
from clearsight.evals.metrics.amber import (
    AmberAnnotation,
    AmberVocabulary,
    amber_measures,
    score_amber,
    score_generative,
)
from clearsight.evals.runner import score_outputs

RELATION = {"dog": ["puppy"], "cat": ["kitten", "animal"], "car": ["vehicle"], "tree": [], "grass": [], "frisbee": []}
ANNOTATIONS = [
    {"id": 1, "type": "generative", "truth": ["dog", "tree"], "hallu": ["cat"]},
    {"id": 2, "type": "generative", "truth": ["car"], "hallu": ["frisbee", "dog"]},
    {"id": 3, "type": "generative", "truth": ["cat"], "hallu": ["dog"]},
    {"id": 4, "type": "discriminative-hallucination", "truth": "no"},
    {"id": 5, "type": "discriminative-hallucination", "truth": "yes"},
    {"id": 6, "type": "discriminative-attribute-state", "truth": "no"},
    {"id": 7, "type": "discriminative-attribute-number", "truth": "yes"},
    {"id": 8, "type": "discriminative-relation", "truth": "no"},
    {"id": 9, "type": "discriminative-relation", "truth": "yes"},
]
RESPONSES = {
    # puppy -> dog, tree -> tree (truth covered); kitten: a hallu object's word (cat covered, hallucinated);
    # animal: a safe word (counted, not hallucinated); "Trees": capitalised, not the vocabulary word "tree"
    1: "A puppy runs under a tree while a kitten and an animal watch. Trees sway.",
    # frisbee (hallu, covered), grass (hallucinated), dogs -> dog (hallu, covered); the car is not mentioned
    2: "A frisbee near the grass, and dogs.",
    3: "A kitten sleeps.",  # kitten -> cat: truth covered, nothing hallucinated
    4: "No", 5: "Yes", 6: "no", 7: "No", 8: "No.", 9: "Yes",
}


@pytest.fixture()
def amber_root(tmp_path):
    root = tmp_path / "AMBER" / "data"
    (root / "query").mkdir(parents=True)
    images = tmp_path / "AMBER" / "image"
    images.mkdir()
    (root / "annotations.json").write_text(json.dumps(ANNOTATIONS))
    (root / "relation.json").write_text(json.dumps(RELATION))
    (root / "safe_words.txt").write_text("animal\n")
    queries = [{"id": a["id"], "image": f"AMBER_{a['id']}.jpg",
                "query": "Describe this image." if a["type"] == "generative" else "Is there a dog in this image?"}
               for a in ANNOTATIONS]
    (root / "query" / "query_generative.json").write_text(json.dumps(queries[:3]))
    (root / "query" / "query_discriminative.json").write_text(json.dumps(queries[3:]))
    for q in queries:
        (images / q["image"]).write_bytes(b"jpg")
    return root, images


def test_generative_and_discriminative_hand_computed(amber_root):
    root, images = amber_root
    data = load_amber(root, images)
    anns = [data.annotations[i] for i in range(1, 10)]
    r = score_amber(anns, [RESPONSES[i] for i in range(1, 10)], data.vocab)
    g = r.generative
    # words 4 + 3 + 1 = 8, hallucinated 1 + 3 + 0 = 4 -> CHAIR 1/2; truth covered 2 + 0 + 1 of 2 + 1 + 1 -> 3/4;
    # responses with a hallucination 2 of 3; hallu covered 1 + 2 + 0 of 1 + 2 + 1 -> 3/4
    assert (g.chair, g.cover, g.hal, g.cog) == pytest.approx((0.5, 0.75, 2 / 3, 0.75))
    assert g.per_response[0]["words"] == ["puppy", "tree", "kitten", "animal"]
    assert g.per_response[1]["hallucinated"] == ["frisbee", "grass", "dog"]
    # official exact match: "no" and "No." are neither answer. Right: 4, 5, 9 of 6 -> 1/2. "No" positive:
    # said No 2 (4, 7), truth No 3 (4, 6, 8), both 1 (4) -> P 1/2, R 1/3, F1 = 2 (1/6) / (5/6) = 0.4
    d = r.discriminative
    every = d["all"]
    assert (every.accuracy, every.precision, every.recall, every.f1) == pytest.approx((0.5, 0.5, 1 / 3, 0.4))
    assert d["all"].unparsed == 2
    assert (d["existence"].accuracy, d["existence"].f1) == (1.0, 1.0)
    assert (d["attribute"].accuracy, d["attribute"].f1) == (0.0, 0.0)
    assert (d["relation"].accuracy, d["relation"].precision, d["relation"].f1) == (0.5, 0.0, 0.0)
    assert r.amber_score == pytest.approx(((1 - 0.5) + 0.4) / 2)
    # with POPE's parser "no" and "No." are no: right 5 of 6; said No 4, both 3 -> P 3/4, R 1, F1 6/7
    p = score_amber(anns, [RESPONSES[i] for i in range(1, 10)], data.vocab, parser="pope").discriminative["all"]
    assert (p.accuracy, p.precision, p.recall, p.f1) == pytest.approx((5 / 6, 0.75, 1.0, 6 / 7))


def test_synonyms_are_exact_words_only():
    """The documented difference: without spaCy vectors a near-synonym not in relation.json is hallucinated."""
    vocab = AmberVocabulary({"dog": ["puppy"], "hound": []})
    words, flags, covered, _ = vocab.check("A hound and a puppy.", ["dog"], [])
    assert words == ["hound", "puppy"] and flags == [True, False] and covered == [True]


def test_through_the_runner_with_query_all_and_bad_files(amber_root, tmp_path):
    root, images = amber_root
    every = json.loads((root / "query" / "query_generative.json").read_text()) + \
        json.loads((root / "query" / "query_discriminative.json").read_text())
    for part in ("generative", "discriminative"):
        (root / "query" / f"query_{part}.json").unlink()
    (root / "query" / "query_all.json").write_text(json.dumps(every))
    job = parse_job({"systems": [{"name": "theirs", "model": "external:theirs"}],
                     "benchmarks": [{"kind": "amber", "data": None, "root": str(root), "image_dir": str(images)}],
                     "output": str(tmp_path / "out"), "stats": {"resamples": 200}})
    results = score_outputs(job, {"theirs": {str(k): v for k, v in RESPONSES.items()}})
    r = results.systems[0]["amber"]
    assert r.generative.chair == 0.5 and r.amber_score == pytest.approx(0.45)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## AMBER" in md and "| theirs | 50.0 | 75.0 | 66.7 | 75.0 | 100.0 / 100.0 | 0.0 / 0.0 | 50.0 / 0.0 | " \
                                 "50.0 / 40.0 | 45.0 |" in md
    (images / "AMBER_9.jpg").unlink()
    with pytest.raises(EvalInputError, match="AMBER image .*AMBER_9.jpg .*does not exist"):
        load_amber(root, images)
    with pytest.raises(EvalInputError, match="unknown part 'both'"):
        parse_job({"systems": [{}], "benchmarks": [{"kind": "amber", "parts": ["both"]}]})


def test_shapes_world_amber_files(shapes_cache):
    from clearsight.evals.datasets.shapes import resolve_builtin
    from clearsight.evals.metrics.partner import partner_map

    world = resolve_builtin("builtin:shapes")
    partners = partner_map(world.spec.partner_pairs)
    files = build_shapes_amber(world.instances, partners)
    anns = json.loads(files["annotations.json"])
    inst = json.loads(world.instances.read_text())
    cats = {c["id"]: c["name"] for c in inst["categories"]}
    first = inst["images"][0]["id"]
    present = {cats[a["category_id"]] for a in inst["annotations"] if a["image_id"] == first}
    assert anns[0]["type"] == "generative" and set(anns[0]["truth"]) == present
    assert set(anns[0]["hallu"]) == {partners[s] for s in present if s in partners} - present
    kinds = {a["type"] for a in anns}
    assert {"discriminative-hallucination", "discriminative-attribute-state", "discriminative-attribute-number",
            "discriminative-relation"} <= kinds
    assert [a["id"] for a in anns] == list(range(1, len(anns) + 1))  # entry id - 1 is its index, as official


def _measure_table(measures):
    """Each Measure as plain lists, so a comparison shows every field that differs."""
    return [(m.benchmark, m.metric, m.split, m.kind, m.label, m.higher_is_better,
             {k: v.tolist() for k, v in m.num.items()}, {k: v.tolist() for k, v in m.den.items()})
            for m in measures]


def test_amber_measures_per_sample_by_hand():
    """The per-sample outcomes the statistics use (no runner): generative and discriminative queries
    interleaved, two systems, every Measure field worked out by hand in the comments."""
    vocab = AmberVocabulary({"dog": ["puppy"], "cat": ["kitten", "animal"], "car": [], "tree": []}, ["animal"])
    anns = [AmberAnnotation.model_validate(a) for a in (
        {"id": 1, "type": "generative", "truth": ["dog", "tree"], "hallu": ["cat"]},
        {"id": 2, "type": "discriminative-hallucination", "truth": "no"},
        {"id": 3, "type": "generative", "truth": ["car"], "hallu": ["dog"]},
        {"id": 4, "type": "discriminative-relation", "truth": "yes"},
        {"id": 5, "type": "discriminative-attribute-state", "truth": "no"},
    )]
    texts = {
        # 1: puppy covers dog; kitten hallucinated (covers the hallu cat); animal safe; car hallucinated:
        #    2 hallucinated of 4 words, 1 of 2 truth objects covered. 3: tree is no object of query 3:
        #    hallucinated, 1 of 1 word, car not covered. 2 "No" right (a true No); 4 "Yes" right;
        #    5 "no" is no exact "No": wrong, a missed No.
        "a": ["A puppy and a kitten and an animal and a car.", "No", "A tree.", "Yes", "no"],
        # 1: dog covers dog, nothing hallucinated; 3: no words; 2 "Yes" for a no (missed No);
        #    4 "No" for a yes (a false No); 5 "No" right
        "b": ["A dog.", "Yes", "", "No", "No"],
    }
    got = _measure_table(amber_measures(anns, texts, vocab))
    assert got == [
        ("amber", "chair", "generative", "ratio", "AMBER CHAIR", False,
         {"a": [2.0, 1.0], "b": [0.0, 0.0]}, {"a": [4.0, 1.0], "b": [1.0, 0.0]}),
        ("amber", "hal", "generative", "proportion", "Hal", False,
         {"a": [1.0, 1.0], "b": [0.0, 0.0]}, {"a": [1.0, 1.0], "b": [1.0, 1.0]}),
        ("amber", "cover", "generative", "ratio", "Cover", True,
         {"a": [1.0, 0.0], "b": [1.0, 0.0]}, {"a": [2.0, 1.0], "b": [2.0, 1.0]}),
        ("amber", "accuracy", "discriminative", "proportion", "accuracy", True,
         {"a": [1.0, 1.0, 0.0], "b": [0.0, 0.0, 1.0]}, {"a": [1.0, 1.0, 1.0], "b": [1.0, 1.0, 1.0]}),
        # F1 with No positive: num 2 TP, den 2 TP + FP + FN per query
        ("amber", "f1", "discriminative", "ratio", "F1 (No positive)", True,
         {"a": [2.0, 0.0, 0.0], "b": [0.0, 0.0, 2.0]}, {"a": [2.0, 0.0, 1.0], "b": [1.0, 1.0, 2.0]}),
    ]
    # the POPE parser reads "no" as No: query 5 right for system a; another benchmark name is kept
    pope = _measure_table(amber_measures(anns, texts, vocab, parser="pope", benchmark="shapes-amber"))
    assert [m[:2] for m in pope] == [("shapes-amber", x) for x in ("chair", "hal", "cover", "accuracy", "f1")]
    assert pope[3][6]["a"] == [1.0, 1.0, 1.0] and pope[4][6]["a"] == [2.0, 0.0, 2.0]
    assert pope[4][7]["a"] == [2.0, 0.0, 2.0]
    # one part only: only its measures
    assert [m.metric for m in amber_measures(anns[:1], {"a": texts["a"][:1]}, vocab)] == ["chair", "hal", "cover"]
    assert [m.metric for m in amber_measures(anns[1:2], {"a": ["No"]}, vocab)] == ["accuracy", "f1"]


def test_generative_edges_objects_outside_the_vocabulary_and_messages():
    """An annotated object missing from relation.json covers only itself (no associated words); a generative
    query whose truth is not a list has no truth objects; the two input errors in full."""
    vocab = AmberVocabulary({"dog": ["puppy"]})
    # "unicorn" is no vocabulary word: it is never found, and is not covered
    assert vocab.check("A puppy.", ["unicorn", "dog"], ["dragon"]) == (["puppy"], [False], [False, True], [False])
    odd = AmberAnnotation(id=1, type="generative", truth="no", hallu=["dog"])
    g = score_generative([odd], ["A puppy."], vocab)
    # no truth objects: cover 0 / 0 -> 0; puppy covers the hallu dog: hallucinated, Cog 1 / 1
    assert (g.chair, g.cover, g.hal, g.cog) == (1.0, 0.0, 1.0, 1.0)
    # a whole row, as results.json keeps it (every key: a renamed one loses the field for its readers)
    assert g.per_response == [{"id": 1, "words": ["puppy"], "hallucinated": ["puppy"], "truth_covered": 0,
                               "truth": 0, "hallu_covered": 1, "hallu": 1}]
    cover = next(m for m in amber_measures([odd], {"a": ["A puppy."]}, vocab) if m.metric == "cover")
    assert (cover.num["a"].tolist(), cover.den["a"].tolist()) == ([0.0], [0.0])
    with pytest.raises(EvalInputError) as err:
        score_generative([odd], [], vocab)
    assert str(err.value) == "AMBER: 1 generative queries but 0 responses"
    with pytest.raises(EvalInputError) as err:
        score_generative([], [], vocab)
    assert str(err.value) == "AMBER: no generative queries to score"


def test_discriminative_only_lopsided_truths_and_non_alphabetic_tokens():
    """Only discriminative queries: no AMBER score (it needs CHAIR); more "no" truths than "yes" (recall's
    denominator); a token with a hyphen is not singularised (as CHAIR's tokens), so "t-shirts" is no word."""
    anns = [AmberAnnotation(id=i, type="discriminative-hallucination", truth=t)
            for i, t in enumerate(["no", "no", "yes"], start=1)]
    r = score_amber(anns, ["No", "Yes", "Yes"], AmberVocabulary({}))
    # said No 1 (right), truth No 2: P 1, R 1/2, F1 2/3; right 2 of 3
    d = r.discriminative["all"]
    assert (d.accuracy, d.precision, d.recall, d.f1) == pytest.approx((2 / 3, 1.0, 0.5, 2 / 3))
    assert r.generative is None and r.amber_score is None
    vocab = AmberVocabulary({"t-shirt": [], "dog": []})
    assert vocab.nouns("Two t-shirts, a t-shirt and dogs.") == ["t-shirt", "dog"]
