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
    # no statistics in these results (no per-sample outcomes): no forest or error-bar plots
    assert set(paths) == {"results.json", "report.md", "crosscheck.png"}
    for name in ("crosscheck.png",):
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


def _stats_results(decodes):
    """Three systems with per-question outcomes: 'pai' says yes to absent partners far more often."""
    import numpy as np

    from clearsight.evals.stats import Measure, StatsSettings, compute_stats

    n = 200
    base = np.array([1.0] * 100 + [0.0] * 100)
    yes = {"none": base, "pai": np.array([1.0] * 140 + [0.0] * 60), "vcd": np.array([1.0] * 101 + [0.0] * 99)}
    ones = {k: np.ones(n) for k in yes}
    measures = [Measure("pope", "partner_yes", "partner", "proportion", yes, ones, "partner yes-rate", False),
                Measure("pope", "present_yes", "partner", "proportion", yes, ones, "present yes-rate", True)]
    stats = compute_stats(measures, ["none", "pai", "vcd"], "none", StatsSettings(resamples=300))
    systems = [SystemResult(name=k, decode=d) for k, d in zip(["none", "pai", "vcd"], decodes)]
    return EvalResults(systems=systems, stats=stats, notes={"cannot_act": {"vcd": "an example reason"}})


def test_verdict_names_exactly_the_significant_differences_and_forest_plots(tmp_path):
    from clearsight.evals.verdict import describe, verdict_lines

    results = _stats_results([{"greedy": True}] * 3)
    lines = verdict_lines(results)
    pai = [d for d in results.stats.differences if d.system == "pai"]
    assert all(d.significant for d in pai)
    assert lines["pai"] == "; ".join(describe(d) for d in pai) + ", significant"
    assert describe(pai[0]) == "partner yes-rate +20.0 points " + f"[{100 * pai[0].low:+.1f}, {100 * pai[0].high:+.1f}]"
    assert lines["vcd"].startswith("no difference from none is significant after correction")
    assert lines["vcd"].endswith("(cannot act on this model: an example reason)")
    paths = write_report(results, tmp_path)
    md = paths["report.md"].read_text()
    assert md.index("## Verdict") < md.index("## Prior-driven")
    assert "All 3 systems: `{\"greedy\": true}`" in md and "| system | decode |" not in md
    assert {"forest_partner.png", "figures.png"} <= set(paths)
    assert paths["forest_partner.png"].read_bytes()[:4] == b"\x89PNG"


def test_decode_settings_table_when_systems_differ(tmp_path):
    md = write_report(_stats_results([{"greedy": True}, {"greedy": False}, {"greedy": True}]),
                      tmp_path)["report.md"].read_text()
    assert "| system | decode |" in md and md.count("`{\"greedy\": true}`") == 2


def _diff(metric, estimate, significant, split="partner"):
    from clearsight.evals.stats import Difference

    return Difference(system="s", baseline="none", benchmark="mine", metric=metric, split=split, n=10,
                      estimate=estimate, low=estimate, high=estimate, test="bootstrap", p_value=0.01, p_holm=0.01,
                      significant=significant)


def test_verdict_reading_comes_from_the_benchmark_that_owns_the_metrics():
    from clearsight.evals.verdict import _reading

    kinds = ("partner_yes", "control_yes", "present_yes")
    up = [_diff(k, 0.05, True) for k in kinds]
    assert _reading(up, up) == "more yes to everything"
    down = [_diff(k, -0.05, True) for k in kinds]
    assert _reading(down, down) == "more no to everything"
    measured = [_diff("partner_yes", -0.05, True), _diff("present_yes", -0.01, False)]
    assert _reading(measured[:1], measured) == "fewer yes to absent partners, not fewer to present shapes"
    measured = [_diff("partner_yes", 0.05, True), _diff("control_yes", 0.01, False)]
    assert _reading(measured[:1], measured) == "more yes to absent partners, not to other absent shapes"
    # the same metric names outside the partner questions tell nothing (the reading is POPE's own)
    other = [_diff(k, 0.05, True, split="random") for k in kinds]
    assert _reading(other, other) is None


@pytest.mark.parametrize(("spec", "config", "reason"), [
    ("var", {"text_config": {"hidden_size": 192}}, "var can find no sinks: |x_d / rms(x)| <= sqrt(192) = 13.9"),
    ("var", {"hidden_size": 4096}, None),  # sqrt(4096) = 64 > tau = 20: sinks are possible
    ("var:tau=10", {"hidden_size": 192}, None),
    ("cca", {}, "cca needs a checkpoint trained with it"),
    ("cca", {"clearsight_trained_with": ["cca"]}, None),
    ("cca:trained=true", {}, None),
    ("mma", {"clearsight_trained_with": ["cca"]}, "mma needs a checkpoint trained with it"),
    ("mma", {"mma": True}, None),
    ("vcd", {"hidden_size": 192}, None),
])
def test_each_mitigation_says_when_it_cannot_act_on_a_config(spec, config, reason):
    from clearsight.mitigations import parse_mitigation

    got = parse_mitigation(spec).cannot_act_on(config)
    assert (got is None) if reason is None else got.startswith(reason), got
