"""`make demo`'s job: the demo model, unmitigated and with every registered mitigation."""

from __future__ import annotations

import json

from clearsight.cli import main
from clearsight.evals.demo import PARTNER, demo_job
from clearsight.evals.report import EvalResults
from clearsight.evals.verdict import verdict_lines
from clearsight.mitigations import REGISTRY

IN_DEMO = {n for n, cls in REGISTRY.items() if not n.startswith("test-") and cls.in_demo}


def test_demo_job_covers_every_mitigation():
    job = demo_job(per_split=5, n_images=3)
    names = [s.label for s in job.systems]
    assert names[0] == "none"
    assert set(names) == IN_DEMO and "inter" in IN_DEMO and "carve" not in IN_DEMO
    kinds = sorted(b.kind for b in job.benchmarks)
    assert kinds == ["chair", "pope"]
    assert job.benchmarks[0].splits == ["random", "popular", "adversarial"]


def test_demo_job_sizes_give_the_partner_yes_rate_a_ci_within_4_points():
    # issue 16: the worst case of a Wilson half-width is at p = 0.5
    job = demo_job()
    n = job.benchmarks[0].partner
    assert 1.959964 * (0.25 / n) ** 0.5 <= 0.0405 and n == PARTNER


def test_demo_runs_the_organism_on_its_world():
    job = demo_job(per_split=5, n_images=3)
    assert {s.model for s in job.systems} == {"builtin:shapes-organism"}
    assert {b.data for b in job.benchmarks} == {"builtin:shapes-organism"}
    assert {b.data for b in demo_job(model="builtin:shapes-llava").benchmarks} == {"builtin:shapes"}


def test_demo_command_runs_small_and_leads_with_the_verdict_of_results_json(tmp_path, capsys):
    out = tmp_path / "demo"
    # the shapes-llava model on the session's shapes world (the organism's world is built by the card's command)
    assert main(["demo", "--out", str(out), "--per-split", "2", "--n-images", "2", "--partner", "2",
                 "--model", "builtin:shapes-llava", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "## POPE" in printed and "## CHAIR" in printed and "## Prior-driven hallucination" in printed
    data = json.loads((out / "results.json").read_text())
    systems = [s["name"] for s in data["systems"]]
    assert systems[0] == "none" and len(systems) == len(IN_DEMO)
    # the printed verdict is the one results.json supports, and it comes first
    lines = verdict_lines(EvalResults.model_validate(data))
    assert set(lines) == set(systems[1:])
    assert printed.index("## Verdict") < printed.index("## POPE")
    for name, text in lines.items():
        assert f"- **{name}**: {text}." in printed
        sig = [d for d in data["stats"]["differences"] if d["system"] == name and d["significant"]]
        assert ("significant after correction" in text) == (not sig and not all(
            d["identical"] for d in data["stats"]["differences"] if d["system"] == name))
    assert data["stats"]["baseline"] == "none" and data["stats"]["resamples"] == 2000


def test_demo_executor_flags_reach_the_job(monkeypatch, tmp_path, capsys):
    import pytest

    import clearsight.evals.runner as runner

    class Ran(Exception):
        pass

    def run_job(job, progress=None):
        raise Ran(job)

    monkeypatch.setattr(runner, "run_job", run_job)
    with pytest.raises(Ran) as ran:
        main(["demo", "--out", str(tmp_path / "d"), "--executor", "ray", "--workers", "2", "--no-progress"])
    job = ran.value.args[0]
    assert (job.executor, job.workers) == ("ray", 2)
    assert main(["demo", "--workers", "0", "--out", str(tmp_path / "e")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: --workers 0 is out of range: give a whole number from 1 to 1024"
