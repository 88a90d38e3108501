"""The Ray executor on a two-node ``ray.cluster_utils.Cluster`` (both nodes on this machine): the same records
and metrics as the local executor, and the same again after a worker, a node or the driver is killed
mid-run (every cache key exactly once). The oracle is the local executor's run of the same job."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from clearsight.evals.job import load_job, parse_job
from clearsight.evals.runner import run_job

ray = pytest.importorskip("ray")
from clearsight.workers.executor import RayExecutor, RaySettings  # noqa: E402

TINY = "builtin:tiny-llava"
SYSTEMS = [{"name": "base", "model": TINY}, {"name": "vcd", "model": TINY, "mitigations": ["vcd"]}]
BENCH = [{"kind": "pope", "limit": 2}, {"kind": "chair", "n_images": 2, "max_new_tokens": 6}]
N_KEYS = 2 * (6 + 2)


def _job_data(out: Path, **kw) -> dict:
    return {"systems": SYSTEMS, "benchmarks": BENCH, "output": str(out), "batch_size": 2, **kw}


@pytest.fixture(scope="module")
def cluster(shapes_cache):
    """Head (2 CPUs) + a second node (2 CPUs); this process is the driver. Torn down after the module."""
    from ray.cluster_utils import Cluster

    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"  # a test cluster of this process only; no token file
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    node2 = c.add_node(num_cpus=2)
    try:
        ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
        c.wait_for_nodes()
        yield c, node2
    finally:
        ray.shutdown()
        c.shutdown()
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old


@pytest.fixture(scope="module")
def reference(tmp_path_factory, shapes_cache):
    """The local executor's run: the oracle."""
    out = tmp_path_factory.mktemp("local")
    results = run_job(parse_job(_job_data(out)), progress=None)
    return _records(out), results


def _records(out: Path) -> list[dict]:
    """Every cache line (duplicates kept, so that a test sees them), timings aside."""
    return [{k: v for k, v in json.loads(line).items() if k != "timing"}
            for line in (out / "generations.jsonl").read_text().splitlines()]


def _check_same(out: Path, results, reference) -> None:
    ref_records, ref_results = reference
    rows = _records(out)
    assert len(rows) == len({r["key"] for r in rows}) == N_KEYS  # every key exactly once
    assert {r["key"]: r for r in rows} == {r["key"]: r for r in ref_records}
    for a, b in zip(results.systems, ref_results.systems):
        assert a.pope == b.pope and a.chair == b.chair


class _KillAfter:
    """A progress bar that runs ``action`` once, after ``n`` records: the fault, injected mid-run."""

    def __init__(self, n: int, action) -> None:
        self.n, self.action, self.count = n, action, 0

    def __call__(self, total: int, desc: str) -> _KillAfter:
        return self

    def update(self, k: int) -> None:
        self.count += k
        if self.count == self.n:
            self.action()

    def set_postfix_str(self, *a, **k) -> None: ...

    def close(self) -> None: ...


def test_two_workers_write_the_local_executors_records_and_metrics(cluster, reference, tmp_path):
    ex = RayExecutor(RaySettings(workers=2, batch_size=2))
    try:
        results = run_job(parse_job(_job_data(tmp_path)), executor=ex, progress=None)
        pids = {pid for pid, _ in ex.where()}
    finally:
        ex.close()
    assert len(pids) == 2 and os.getpid() not in pids  # two worker processes, neither of them this driver
    _check_same(tmp_path, results, reference)


def test_a_worker_killed_mid_batch_is_restarted_and_its_items_run_again(cluster, reference, tmp_path):
    ex = RayExecutor(RaySettings(workers=2, batch_size=2))
    try:
        (victim, _), _ = ex.where()
        bar = _KillAfter(3, lambda: os.kill(victim, signal.SIGKILL))
        results = run_job(parse_job(_job_data(tmp_path)), executor=ex, progress=bar)
        after = {pid for pid, _ in ex.where()}
    finally:
        ex.close()
    assert bar.count == N_KEYS
    assert ex.retried >= 1, "the killed worker had no chunk in flight: the test did not test a fault"
    assert victim not in after and len(after) == 2  # restarted as a new process
    _check_same(tmp_path, results, reference)


def test_the_driver_killed_then_rerun_resumes_from_the_cache(cluster, reference, tmp_path):
    c, _ = cluster
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps(_job_data(tmp_path / "out", executor="ray", workers=2)))
    cmd = [sys.executable, "-m", "clearsight", "eval", "run", str(job_file), "--address", c.address, "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "out" / "generations.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and (not cache.exists() or
                                                              len(cache.read_text().splitlines()) < 4):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_before = len(cache.read_text().splitlines())
    assert 4 <= n_before < N_KEYS, "the driver was not killed in the middle"
    results = run_job(load_job(job_file), progress=None)  # the same job again, on the same cluster
    _check_same(tmp_path / "out", results, reference)


def test_a_lost_node_s_items_run_on_the_other_node(cluster, reference, tmp_path):
    """Last in the module: the second node does not come back."""
    c, node2 = cluster
    ex = RayExecutor(RaySettings(workers=2, batch_size=2))  # SPREAD: one worker per node
    try:
        nodes = {node for _, node in ex.where()}
        assert node2.node_id in nodes, "no worker on the second node: the test would not lose any work"
        bar = _KillAfter(3, lambda: c.remove_node(node2))
        results = run_job(parse_job(_job_data(tmp_path)), executor=ex, progress=bar)
        after = {node for _, node in ex.where()}
    finally:
        ex.close()
    assert ex.retried >= 1
    assert after == {c.head_node.node_id}  # the lost node's worker was restarted on the head
    _check_same(tmp_path, results, reference)
