"""`make demo`'s job: the demo model, unmitigated and with every registered mitigation."""

from __future__ import annotations

import json

from clearsight.cli import main
from clearsight.evals.demo import demo_job
from clearsight.mitigations import REGISTRY


def test_demo_job_covers_every_mitigation():
    job = demo_job(per_split=5, n_images=3)
    names = [s.label for s in job.systems]
    assert names[0] == "none"
    assert set(names) == {n for n in REGISTRY if not n.startswith("test-")}
    kinds = sorted(b.kind for b in job.benchmarks)
    assert kinds == ["chair", "pope"]
    assert job.benchmarks[0].splits == ["random", "popular", "adversarial"]


def test_demo_command_runs_small(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--per-split", "2", "--n-images", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "## POPE" in printed and "## CHAIR" in printed
    systems = [s["name"] for s in json.loads((out / "results.json").read_text())["systems"]]
    assert systems[0] == "none" and len(systems) == len({n for n in REGISTRY if not n.startswith("test-")})
