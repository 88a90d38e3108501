"""``clearsight eval submit|status|logs|stop`` against a Ray head this module starts (``ray start --head``,
its own temp dir and ports, so another cluster on the machine is never touched) and tears down."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from clearsight.cli import main

pytest.importorskip("ray")

TINY = "builtin:tiny-llava"


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ours(temp_dir: str) -> list[int]:
    """pids of the processes whose command line names our temp dir (what `ray start` left running)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if temp_dir.encode() in (d / "cmdline").read_bytes():
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


@pytest.fixture(scope="module")
def head(shapes_cache):
    """A head with the dashboard (the Job API); stopped by killing its process group and whatever else was
    started under its temp dir (never `ray stop`, which stops every Ray of this user on the machine)."""
    temp_dir = tempfile.mkdtemp(prefix="/tmp/csj-")  # short: Ray's socket paths must fit in 107 bytes
    gcs, dash, client, agent, agent_grpc, metrics, env_agent, nm, om = _free_ports(9)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway local head: no token file written
    cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--num-cpus=1",
           f"--port={gcs}", f"--dashboard-port={dash}", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
           f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
           f"--runtime-env-agent-port={env_agent}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
           f"--temp-dir={temp_dir}", "--disable-usage-stats"]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    try:
        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + 180
        while True:
            try:
                JobSubmissionClient(address).list_jobs()
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(1)
        yield address
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in [proc.pid, *_ours(temp_dir)]:  # a throwaway cluster: nothing to save
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)
        if old is None:
            os.environ.pop("RAY_AUTH_MODE", None)
        else:
            os.environ["RAY_AUTH_MODE"] = old


def _status(capsys, job_id: str, address: str) -> dict:
    capsys.readouterr()
    assert main(["eval", "status", job_id, "--address", address, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _wait(capsys, job_id: str, address: str, states: set[str], timeout: float = 240) -> dict:
    deadline = time.time() + timeout
    while True:
        st = _status(capsys, job_id, address)
        if st["status"] in states or time.time() > deadline:
            return st
        time.sleep(1)


def test_submit_status_logs_stop(head, tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"systems": [{"name": "base", "model": TINY}], "output": str(tmp_path / "out"),
                               "benchmarks": [{"kind": "pope", "limit": 1, "max_new_tokens": 4}]}))
    assert main(["eval", "submit", str(job), "--address", head, "--id", "cs-done"]) == 0
    assert capsys.readouterr().out.strip() == "cs-done"
    st = _wait(capsys, "cs-done", head, {"SUCCEEDED", "FAILED", "STOPPED"})
    assert st["status"] == "SUCCEEDED", st
    assert st["output"] == str((tmp_path / "out").resolve())
    assert st["progress"]["state"] == "done" and st["progress"]["systems"] == {"base": {"done": 3, "total": 3}}
    assert (tmp_path / "out" / "results.json").is_file()
    assert main(["eval", "logs", "cs-done", "--address", head]) == 0
    assert "output: " + str((tmp_path / "out").resolve()) in capsys.readouterr().out  # the run's last line

    # a longer job, stopped while it runs; rerunning it would resume from its cache
    job.write_text(json.dumps({"systems": [{"name": "base", "model": TINY}], "output": str(tmp_path / "long"),
                               "benchmarks": [{"kind": "pope", "limit": 400, "max_new_tokens": 32}]}))
    assert main(["eval", "submit", str(job), "--address", head, "--id", "cs-stop"]) == 0
    _wait(capsys, "cs-stop", head, {"RUNNING"})
    assert main(["eval", "stop", "cs-stop", "--address", head]) == 0
    assert "stop requested" in capsys.readouterr().out
    assert _wait(capsys, "cs-stop", head, {"STOPPED", "SUCCEEDED", "FAILED"})["status"] == "STOPPED"


def test_job_errors_are_one_line(head, tmp_path, capsys):
    assert main(["eval", "status", "no-such-job", "--address", head]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: status: no job 'no-such-job'") and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"systems": [{"model": TINY}], "benchmarks": [{"kind": "pope"}], "workers": 0}))
    assert main(["eval", "submit", str(bad), "--address", head]) == 2  # checked here, never submitted
    assert "workers" in capsys.readouterr().err
    port = _free_ports(1)[0]
    assert main(["eval", "status", "x", "--address", f"http://127.0.0.1:{port}"]) == 2
    assert "cannot reach a Ray dashboard" in capsys.readouterr().err


def test_bad_run_flags_are_one_line_before_anything_starts(tmp_path, capsys):
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"systems": [{"model": TINY}], "benchmarks": [{"kind": "pope"}],
                               "output": str(tmp_path / "out")}))
    assert main(["eval", "run", str(job), "--workers", "0", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: job file") and "workers: Input should be greater than or equal to 1" in err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()
    job.write_text(json.dumps({"systems": [{"model": TINY}], "benchmarks": [{"kind": "pope"}], "executor": "dask"}))
    assert main(["eval", "run", str(job), "--no-progress"]) == 2
    assert "executor: Input should be 'local' or 'ray'" in capsys.readouterr().err
    port = _free_ports(1)[0]  # nobody listens: one line at once, the fresh output folder removed again
    job.write_text(json.dumps({"systems": [{"model": TINY}], "benchmarks": [{"kind": "pope"}],
                               "output": str(tmp_path / "out")}))
    assert main(["eval", "run", str(job), "--address", f"127.0.0.1:{port}", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: ray_address '127.0.0.1:{port}': nothing answers there") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()
