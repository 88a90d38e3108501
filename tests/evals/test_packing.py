"""Cross-system packing: the systems sharing a model run as one stream of mixed batches, and every record is
the one the unpacked run (one system after the other) writes."""

from __future__ import annotations

import json

import pytest

from clearsight.evals.job import parse_job
from clearsight.evals.progress import read_progress
from clearsight.evals.runner import run_job

TINY = "builtin:tiny-llava"
SYSTEMS = [
    {"name": "base", "model": TINY},
    {"name": "vcd", "model": TINY, "mitigations": ["vcd"]},  # branch rows: more rows per request
    # another backend: its own batches (and the same cache key as base: outputs do not depend on the backend)
    {"name": "ref", "model": TINY, "backend": "reference"},
    {"name": "sampled", "model": TINY, "decode": {"do_sample": True, "seed": 5, "temperature": 1.3}},
]

pytestmark = pytest.mark.usefixtures("shapes_cache")


def _records(path):
    return {r["key"]: {k: v for k, v in r.items() if k != "timing"}
            for r in map(json.loads, path.read_text().splitlines())}


def test_packed_run_mixes_systems_in_batches_and_writes_the_unpacked_records(tmp_path, monkeypatch):
    from clearsight.decoding.batch import Batch

    mixed: list[int] = []
    real_decode = Batch.decode

    def decode(self):
        mixed.append(len({tuple(m.name for m in e.mitigations) for e in self.entries}))
        return real_decode(self)

    monkeypatch.setattr(Batch, "decode", decode)
    bench = [{"kind": "pope", "limit": 1}, {"kind": "chair", "n_images": 2, "max_new_tokens": 6}]
    results = {}
    for pack in (False, True):
        mixed.clear()
        job = parse_job({"systems": SYSTEMS, "benchmarks": bench, "output": str(tmp_path / str(pack)),
                         "batch_size": 4, "pack": pack})
        results[pack] = run_job(job, progress=None)
        # packed: requests of different systems decode in one batch; unpacked never
        assert (max(mixed) > 1) is pack
        progress = read_progress(tmp_path / str(pack))
        assert progress.state == "done" and progress.done == progress.total == 4 * 5
    unpacked, packed = _records(tmp_path / "False/generations.jsonl"), _records(tmp_path / "True/generations.jsonl")
    assert len(packed) == 3 * 5 and packed == unpacked  # ref's records are base's
    for a, b in zip(results[False].systems, results[True].systems):
        assert a.pope == b.pope and a.chair == b.chair


def test_packed_order_lines_up_the_systems_that_leave_the_forward_alone_sample_by_sample():
    from clearsight.config import DecodeSpec
    from clearsight.evals.executor import Task, WorkItem
    from clearsight.evals.job import SystemSpec
    from clearsight.evals.runner import _packed_order

    systems = [SystemSpec(name="none", model=TINY), SystemSpec(name="pai", model=TINY, mitigations=["pai"]),
               SystemSpec(name="vcd", model=TINY, mitigations=["vcd"]),
               SystemSpec(name="var", model=TINY, mitigations=["var"]),
               SystemSpec(name="both", model=TINY, mitigations=["m3id", "vhr"])]  # one with a hook: not neutral
    items = [WorkItem(f"s{i}", "p", None, n) for i, n in enumerate((4, 4, 9))]
    tasks = [Task(s, DecodeSpec(), it) for s in systems for it in items]
    tasks.sort(key=_packed_order(tasks))
    got = [(t.system.label, t.item.sample_id) for t in tasks]
    assert got == [("none", "s2"), ("vcd", "s2"), ("none", "s0"), ("vcd", "s0"), ("none", "s1"), ("vcd", "s1"),
                   ("pai", "s2"), ("pai", "s0"), ("pai", "s1"), ("var", "s2"), ("var", "s0"), ("var", "s1"),
                   ("both", "s2"), ("both", "s0"), ("both", "s1")]
