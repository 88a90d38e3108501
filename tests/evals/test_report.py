"""Report writer: results.json provenance, Markdown tables, PNG plots, atomic writes, bad input."""

import json

import pytest

from clearsight.evals import (
    DataFile,
    EvalInputError,
    EvalResults,
    SystemResult,
    compute_chair,
    crosscheck_explicit,
    score_pope,
    write_report,
)
from clearsight.evals.datasets.pope import PopeFile, PopeQuestion, PopeSet

OUTPUTS = {
    "A": {"s1": "There is a red cat. There is a blue dog.", "s2": "I see a green car."},
    "B": {"s1": "There is a red cat. Ok then.", "s2": "I see a green car."},
    "C": {"s1": "There is a red cat. There is a blue dog.", "s2": "I see a green bus."},
}


class LastWordScorer:
    name = "last-word"

    def score(self, sentences, evidence):
        words = set(evidence.replace(".", " ").lower().split())
        return [0.0 if s.rstrip(".").split()[-1].lower() in words else 1.0 for s in sentences]


def make_results():
    qs = [PopeQuestion(1, "a.png", "q1", "yes", "random"), PopeQuestion(2, "a.png", "q2", "no", "random")]
    sets = {"random": PopeSet("random", qs, [PopeFile("/data/shapes_pope_random.json", "ab" * 32, 2, "jsonl",
                                                      "random")])}
    good = score_pope(sets, {"random": {1: "Yes.", 2: "No."}})
    bad = score_pope(sets, {"random": {1: "Yes.", 2: "Yes."}})
    gt = {1: {"cat"}}
    systems = [
        SystemResult(name="A", decode={"greedy": True, "max_new_tokens": 16}, pope=good,
                     chair=compute_chair({1: "A cat."}, gt)),
        SystemResult(name="B", decode={"greedy": True, "max_new_tokens": 16}, pope=bad,
                     chair=compute_chair({1: "A cat and a dog."}, gt)),
        SystemResult(name="C", decode={"greedy": True}),
    ]
    return EvalResults(systems=systems, data_files=[DataFile.from_pope(sets["random"].files[0])],
                       pope_parser="pope", crosscheck=crosscheck_explicit(OUTPUTS, LastWordScorer()))


def test_write_report(tmp_path):
    paths = write_report(make_results(), tmp_path / "out")
    assert set(paths) == {"results.json", "report.md", "pope_f1.png", "chair.png", "crosscheck.png"}
    for name in ("pope_f1.png", "chair.png", "crosscheck.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["results.json"].read_text())
    assert data["data_files"][0]["sha256"] == "ab" * 32 and data["data_files"][0]["n"] == 2
    assert data["pope_parser"] == "pope"
    assert data["systems"][0]["decode"] == {"greedy": True, "max_new_tokens": 16}
    assert data["systems"][1]["pope"]["splits"]["random"]["yes_ratio"] == 1.0
    assert data["systems"][1]["chair"]["per_caption"][0]["hallucinated_words"] == ["dog"]
    assert {"python", "numpy", "pydantic", "matplotlib"} <= set(data["package_versions"])
    md = paths["report.md"].read_text()
    assert "## POPE (parser: `pope`)" in md
    assert "| A | 100.0 | 100.0 | 50.0 | 0 | 100.0 | 100.0 |" in md  # acc, F1, yes%, unparsed, mean, pooled
    assert "| B | 50.0 | 66.7 | 100.0 | 0 | 66.7 | 66.7 |" in md
    # "A cat and a dog." vs GT {cat}: CHAIR_s 1/1, CHAIR_i 1/2, recall 1/1, 5 words, N 1
    assert "| B | 100.0 | 50.0 | 100.0 | 5.0 | 1 |" in md
    assert "| 1 | B | 0.250 | 2 |" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files


def test_bad_report_input_writes_nothing(tmp_path):
    r = make_results()
    r.systems.append(SystemResult(name="A"))
    with pytest.raises(EvalInputError, match="duplicate system names"):
        write_report(r, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(EvalInputError, match="no systems"):
        write_report(EvalResults(systems=[]), tmp_path / "out")
