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
