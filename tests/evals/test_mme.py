"""MME hallucination subsets: the official answer rule, acc / acc+ / score on hand-made files in the official
layout (expected values computed by hand in the comments), scoring outside outputs with no model, and the
shapes-world MME-style pairs."""

from __future__ import annotations

import json

import pytest

from clearsight.evals.datasets.mme import build_shapes_mme, load_mme
from clearsight.evals.errors import EvalInputError
from clearsight.evals.job import parse_job
from clearsight.evals.metrics.mme import MmeQuestion, mme_measures, parse_mme, score_mme, score_mme_subset
from clearsight.evals.runner import score_outputs

Q = " Please answer yes or no."


@pytest.fixture()
def mme_root(tmp_path):
    """existence in the flat layout (image + txt side by side), count in images/ + questions_answers_YN/."""
    root = tmp_path / "MME_Benchmark_release_version"
    ex = root / "existence"
    ex.mkdir(parents=True)
    for stem, (yes_q, no_q) in {"a": ("Is there a dog in this image?", "Is there a cat in this image?"),
                                "b": ("Is there a car in this image?", "Is there a bus in this image?"),
                                "c": ("Is there a tree in this image?", "Is there a boat in this image?")}.items():
        (ex / f"{stem}.jpg").write_bytes(b"jpg")
        (ex / f"{stem}.txt").write_text(f"{yes_q}{Q}\tYes\n{no_q}{Q}\tNo\n")
    co = root / "count"
    (co / "images").mkdir(parents=True)
    (co / "questions_answers_YN").mkdir()
    for stem in ("x", "y"):
        (co / "images" / f"{stem}.png").write_bytes(b"png")
        (co / "questions_answers_YN" / f"{stem}.txt").write_text(
            f"Are there two dogs in this image?{Q}\tYes\nAre there three dogs in this image?{Q}\tNo\n")
    return root


def test_official_answer_rule():
    # lowercased; exact yes/no; else "yes" in the first 4 characters, else "no" there, else other
    cases = {"Yes": "yes", "NO": "no", "Yes, there is.": "yes", "No.": "no", "yes.": "yes", "Not really": "no",
             "None": "no", "Nope": "no", "There is a dog": "other", "I think yes": "other", " yes": "yes",
             "Y": "other", "Eyes": "yes", "": "other"}
    assert {t: parse_mme(t) for t in cases} == cases


def test_subset_scores_hand_computed(mme_root):
    sets = load_mme(mme_root, ["existence", "count"])
    ex = sets["existence"].questions
    assert [q.answer for q in ex] == ["yes", "no"] * 3 and ex[0].image == "a.jpg"
    assert sets["count"].questions[0].image == "x.png" and sets["count"].image_dir.name == "images"
    # a: yes/no both right; b: yes right, "Yes" to the no-question wrong; c: "Maybe" (other) wrong, no right
    r = score_mme_subset(ex, ["Yes", "No", "Yes.", "Yes", "Maybe", "No"])
    # acc = 4/6, acc+ = 1/3 (only image a), score = 100 * (4/6 + 1/3) = 100
    assert (r.n_questions, r.n_images, r.other) == (6, 3, 1)
    assert r.accuracy == pytest.approx(4 / 6) and r.accuracy_plus == pytest.approx(1 / 3)
    assert r.score == pytest.approx(100.0)
    perfect = score_mme_subset(sets["count"].questions, ["Yes", "No", "yes", "no"])
    assert perfect.score == pytest.approx(200.0)


def test_bad_files_are_one_line_errors(tmp_path, mme_root):
    (mme_root / "existence" / "d.txt").write_text("Is there a dog?\tYes\n")
    with pytest.raises(EvalInputError, match="no image d.jpg"):
        load_mme(mme_root, ["existence"])
    (mme_root / "existence" / "d.jpg").write_bytes(b"jpg")
    with pytest.raises(EvalInputError, match="has 1 questions; MME pairs exactly 2"):
        score_mme_subset(load_mme(mme_root, ["existence"])["existence"].questions, ["Yes"] * 7)
    (mme_root / "existence" / "d.txt").write_text("Is there a dog? Yes\n")
    with pytest.raises(EvalInputError, match="d.txt:1: not 'question<TAB>Yes|No'"):
        load_mme(mme_root, ["existence"])
    with pytest.raises(EvalInputError, match="subset folder .* does not exist"):
        load_mme(tmp_path / "nowhere", ["color"])
    with pytest.raises(EvalInputError, match="unknown subset 'colour'"):
        parse_job({"systems": [{}], "benchmarks": [{"kind": "mme", "subsets": ["colour"]}]})


def test_outside_outputs_scored_through_the_runner_with_no_model(mme_root, tmp_path, monkeypatch):
    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("clearsight.models.loader.load_model", no_model)
    job = parse_job({"systems": [{"name": "theirs", "model": "external:theirs"},
                                 {"name": "other", "model": "external:other"}],
                     "benchmarks": [{"kind": "mme", "data": None, "root": str(mme_root),
                                     "subsets": ["existence", "count"]}],
                     "output": str(tmp_path / "out"), "stats": {"resamples": 200}})
    ids = ["existence/a/0", "existence/a/1", "existence/b/0", "existence/b/1", "existence/c/0", "existence/c/1",
           "count/x/0", "count/x/1", "count/y/0", "count/y/1"]
    theirs = dict(zip(ids, ["Yes", "No", "Yes.", "Yes", "Maybe", "No", "Yes", "No", "No", "No"]))
    other = dict.fromkeys(ids, "Yes")
    results = score_outputs(job, {"theirs": theirs, "other": other})
    r = results.systems[0]["mme"]
    assert r.subsets["existence"].score == pytest.approx(100.0)
    # count: x both right, y: "No" to the yes-question -> acc 3/4, acc+ 1/2 -> 125
    assert r.subsets["count"].score == pytest.approx(125.0) and r.total == pytest.approx(225.0)
    # always "Yes": acc 1/2, acc+ 0 in both subsets -> 50 + 50
    assert results.systems[1]["mme"].total == pytest.approx(100.0)
    md = (tmp_path / "out" / "report.md").read_text()
    assert "## MME hallucination subsets" in md
    assert "| theirs | 66.7 | 33.3 | 100.0 | 75.0 | 50.0 | 125.0 | 225.0 |" in md
    data = json.loads((tmp_path / "out" / "results.json").read_text())
    assert data["systems"][0]["mme"]["subsets"]["count"]["accuracy_plus"] == 0.5
    with pytest.raises(EvalInputError, match="no text for id 'count/y/1'"):
        score_outputs(job, {"theirs": {k: v for k, v in theirs.items() if k != "count/y/1"}, "other": other})


def test_shapes_world_pairs(shapes_cache):
    from clearsight.evals.datasets.shapes import resolve_builtin

    world = resolve_builtin("builtin:shapes")
    files = build_shapes_mme(world.instances)
    scenes = {im["file_name"].rsplit(".", 1)[0]: im["id"] for im in json.loads(world.instances.read_text())["images"]}
    anns = json.loads(world.instances.read_text())["annotations"]
    cats = {c["id"]: c["name"] for c in json.loads(world.instances.read_text())["categories"]}
    for rel, text in list(files.items())[:40]:
        subset, stem = rel[:-4].split("/")
        objs = [a for a in anns if a["image_id"] == scenes[stem]]
        (yes_q, yes_a), (no_q, no_a) = (line.split("\t") for line in text.splitlines())
        assert (yes_a, no_a) == ("Yes", "No")
        if subset == "existence":  # the yes-question names a present shape, the no-question an absent one
            present = {cats[a["category_id"]] for a in objs}
            assert yes_q.split()[3] in present and no_q.split()[3] not in present
        if subset == "color":
            shape, colour = yes_q.split()[2:4]
            assert [a["colour"] for a in objs if cats[a["category_id"]] == shape] == [colour]
    assert {rel.split("/")[0] for rel in files} == {"existence", "count", "position", "color"}
    MmeQuestion(subset="count", image="x.png", question="q", answer="yes")  # the record the loader returns


def test_example_job_with_mme_and_amber_is_valid():
    from pathlib import Path

    from clearsight.evals.job import load_job

    job = load_job(Path(__file__).resolve().parents[2] / "examples" / "shapes_mme_amber.toml")
    assert [b.kind for b in job.benchmarks] == ["mme", "amber"] and job.benchmarks[0].limit == 30


def test_answer_rule_edges_and_messages():
    """Metrics mutation survivors (docs/testing.md): only the first four characters count."""
    assert parse_mme("Uh no") == "other" and parse_mme("A yes") == "other"
    with pytest.raises(EvalInputError) as err:
        score_mme_subset([], ["Yes"])
    assert str(err.value) == "score_mme_subset: 0 questions but 1 answers"
    with pytest.raises(EvalInputError) as err:
        score_mme_subset([], [])
    assert str(err.value) == "score_mme_subset: no questions"


def _q(subset, image, answer):
    return MmeQuestion(subset=subset, image=image, question=f"Is it {image}?{Q}", answer=answer)


def test_score_mme_and_mme_measures_by_hand():
    """``score_mme`` over two subsets and the per-question / per-image outcomes of ``mme_measures`` (no
    runner), worked by hand; an image's two questions need not be adjacent (grouped by image)."""
    count = [_q("count", "a", "yes"), _q("count", "b", "no"), _q("count", "a", "no"),
             _q("count", "b", "yes"), _q("count", "c", "yes"), _q("count", "c", "no")]
    existence = [_q("existence", "x", "yes"), _q("existence", "x", "no"),
                 _q("existence", "y", "yes"), _q("existence", "y", "no")]
    # "Yes." yes (right), "No" right, "no" right, "Not sure" no (wrong), "yes" right, "maybe" other (wrong):
    # right 1 1 1 0 1 0; images a (questions 0, 2) both right, b (1, 3) and c (4, 5) not
    sys_a = ["Yes.", "No", "no", "Not sure", "yes", "maybe"]
    sys_b = ["No", "No", "No", "Yes", "Yes", "No"]  # right 0 1 1 1 1 1: a wrong, b and c right
    res = score_mme({"existence": existence, "count": count},
                    {"existence": ["yes", "no", "yes", "yes"], "count": sys_a})
    # existence: 3 / 4 right, 1 / 2 images: 75 + 50; count: 4 / 6, 1 / 3: 66.67 + 33.33 = 100
    assert res.subsets["existence"].score == pytest.approx(125.0)
    c = res.subsets["count"]
    assert (c.n_questions, c.n_images, c.other) == (6, 3, 1)
    assert (c.accuracy, c.accuracy_plus, c.score) == (pytest.approx(4 / 6), pytest.approx(1 / 3), pytest.approx(100.0))
    assert res.total == pytest.approx(225.0) and list(res.subsets) == ["existence", "count"]

    got = [(m.benchmark, m.metric, m.split, m.kind, m.label, m.higher_is_better,
            {k: v.tolist() for k, v in m.num.items()}, {k: v.tolist() for k, v in m.den.items()})
           for m in mme_measures("count", count, {"a": sys_a, "b": sys_b})]
    assert got == [
        ("mme", "accuracy", "count", "proportion", "accuracy", True,
         {"a": [1.0, 1.0, 1.0, 0.0, 1.0, 0.0], "b": [0.0, 1.0, 1.0, 1.0, 1.0, 1.0]},
         {"a": [1.0] * 6, "b": [1.0] * 6}),
        ("mme", "accuracy_plus", "count", "proportion", "accuracy+", True,
         {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 1.0]}, {"a": [1.0] * 3, "b": [1.0] * 3}),
    ]
    assert {m.benchmark for m in mme_measures("count", count, {"a": sys_a}, benchmark="shapes-mme")} == {"shapes-mme"}
    with pytest.raises(EvalInputError, match="image 'a' has 1 questions"):
        mme_measures("count", count[:1], {"a": sys_a[:1]})
