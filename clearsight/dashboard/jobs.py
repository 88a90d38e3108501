"""The Jobs page's logic: make an eval job from a small form, start it locally in the background or on Ray,
follow its progress and logs.

A local job is ``<this python> -m clearsight eval run JOB --output DIR --no-progress`` in its own process
group, its output in ``DIR.log``; a Ray job goes through ``clearsight.workers.jobs.submit`` (the Job
Submission API, as ``clearsight eval submit``). Each started job is recorded as one JSON file in
``<runs>/.dashboard-jobs/``, so the page lists the jobs of earlier dashboard processes too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from clearsight.config import DEFAULT_MODEL
from clearsight.errors import InputError, pydantic_message
from clearsight.evals.job import EvalJob, load_job, parse_job
from clearsight.evals.progress import read_progress

JOBS_DIR = ".dashboard-jobs"
_PROCESSES: dict[int, subprocess.Popen[bytes]] = {}  # pid -> child started by this process (reaped by poll)


class JobForm(BaseModel):
    """The small form: systems as on the command line (``none``, ``var``, ``mine=var:p=0.4+vhr``), POPE on the
    shapes world (questions per split) and / or CHAIR (images)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$", description="the result folder's name")
    model: str = DEFAULT_MODEL
    systems: list[str] = Field(min_length=1)
    pope_limit: int | None = Field(20, ge=1, description="POPE questions per split (None: no POPE)")
    chair_images: int | None = Field(None, ge=1, description="CHAIR images (None: no CHAIR)")
    max_new_tokens: int = Field(64, ge=1, le=8192, description="CHAIR caption length")


def _system(text: str, model: str) -> dict[str, Any]:
    """One ``--system`` value (clearsight eval's syntax: the text before the first '=' is a label only when
    it holds no ':')."""
    label, eq, spec = text.partition("=")
    if not eq or ":" in label:
        label, spec = text, text
    mits = [] if spec.strip() in ("", "none") else [m.strip() for m in spec.split("+") if m.strip()]
    return {"name": label.strip(), "model": model, "mitigations": mits}


def job_from_form(form: JobForm | dict[str, Any], runs: str | Path) -> EvalJob:
    """The eval job the form describes, validated (a bad value is an ``InputError`` naming the field), with
    its output folder ``<runs>/<name>``."""
    try:
        f = form if isinstance(form, JobForm) else JobForm.model_validate(form)
    except ValidationError as exc:
        raise InputError(pydantic_message(exc, "job form")) from None
    benchmarks: list[dict[str, Any]] = []
    if f.pope_limit:
        benchmarks.append({"kind": "pope", "data": "builtin:shapes", "limit": f.pope_limit})
    if f.chair_images:
        benchmarks.append({"kind": "chair", "data": "builtin:shapes", "n_images": f.chair_images,
                           "max_new_tokens": f.max_new_tokens})
    if not benchmarks:
        raise InputError("job form: no benchmark: set POPE questions or CHAIR images")
    data = {"systems": [_system(s, f.model) for s in f.systems if s.strip()], "benchmarks": benchmarks,
            "output": str(Path(runs).resolve() / f.name)}
    return parse_job(data, where="job form")


class JobRecord(BaseModel):
    """A job the dashboard started (one file in ``<runs>/.dashboard-jobs/``)."""

    id: str
    where: Literal["local", "ray"]
    job_file: str
    output: str
    started: float
    pid: int | None = None  # local
    log: str | None = None  # local
    address: str | None = None  # ray


def jobs_dir(runs: str | Path) -> Path:
    return Path(runs) / JOBS_DIR


def write_job_file(job: EvalJob, runs: str | Path) -> Path:
    """The job as a JSON job file in ``<runs>/.dashboard-jobs/`` (what ``clearsight eval run`` reads)."""
    d = jobs_dir(runs)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"{Path(job.output).name}-{uuid.uuid4().hex[:6]}.json"
    path.write_text(job.model_dump_json(indent=2, exclude_unset=True), encoding="utf-8")
    return path


def _save(record: JobRecord, runs: str | Path) -> JobRecord:
    d = jobs_dir(runs)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / f".{record.id}.tmp"
    tmp.write_text(record.model_dump_json(), encoding="utf-8")
    tmp.replace(d / f"{record.id}.record")
    return record


def _check_job_file(job_file: str | Path) -> EvalJob:
    path = Path(job_file)
    if not path.is_file():
        raise InputError(f"job file: {str(path)!r} does not exist: give a .toml / .yaml / .json eval job")
    return load_job(path)  # a bad job is one line now, not a failed background run later


def start_local(job_file: str | Path, runs: str | Path, output: str | Path | None = None) -> JobRecord:
    """Run the job in a background process (its own process group); returns at once."""
    job = _check_job_file(job_file)
    out = Path(output or job.output).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    cmd = [sys.executable, "-m", "clearsight", "eval", "run", str(Path(job_file).resolve()), "--output", str(out),
           "--no-progress"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    _PROCESSES[proc.pid] = proc
    return _save(JobRecord(id=f"local-{proc.pid}-{int(time.time())}", where="local", job_file=str(job_file),
                           output=str(out), started=time.time(), pid=proc.pid, log=str(log)), runs)


def start_ray(job_file: str | Path, runs: str | Path, address: str) -> JobRecord:
    """Submit the job to a Ray cluster's dashboard (``clearsight eval submit``)."""
    from clearsight.cli import build_parser
    from clearsight.workers.jobs import submit

    job = _check_job_file(job_file)
    args = build_parser().parse_args(["eval", "submit", str(job_file), "--address", address])
    job_id = submit(args)
    return _save(JobRecord(id=job_id, where="ray", job_file=str(job_file), output=str(Path(job.output).resolve()),
                           started=time.time(), address=address), runs)


def list_jobs(runs: str | Path) -> list[JobRecord]:
    """The jobs the dashboard started, newest first (unreadable records are skipped)."""
    out = []
    for path in jobs_dir(runs).glob("*.record"):
        try:
            out.append(JobRecord.model_validate_json(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    return sorted(out, key=lambda r: r.started, reverse=True)


def _local_exit(pid: int) -> int | None:
    """The exit status of a local job, None while it runs (-1: ended, status unknown: not our child)."""
    proc = _PROCESSES.get(pid)
    if proc is not None:
        return proc.poll()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return -1
    except PermissionError:
        return None
    return None


def job_status(record: JobRecord) -> dict[str, Any]:
    """``state`` (running / done / failed / stopped), the run's ``progress`` (state, done, total, per system)
    from its ``progress.json``, and a ``message``."""
    progress = read_progress(record.output)
    prog = {"state": progress.state, "done": progress.done, "total": progress.total,
            "systems": {k: [v.done, v.total] for k, v in progress.systems.items()}} if progress else {}
    if record.where == "ray":
        from clearsight.workers.jobs import status

        st = status(record.id, record.address or "")
        ray_state = st["status"].lower()
        state = {"succeeded": "done", "failed": "failed", "stopped": "stopped"}.get(ray_state, "running")
        return {"state": state, "progress": prog, "message": st.get("message") or ray_state}
    rc = _local_exit(record.pid or 0)
    if rc is None:
        state, message = "running", "running"
    elif rc == 0 or (rc == -1 and progress is not None and progress.state == "done"):
        state, message = "done", "finished"
    else:
        state, message = "failed", f"exit status {rc}" if rc != -1 else "ended (see the log)"
    return {"state": state, "progress": prog, "message": message}


def job_log(record: JobRecord, lines: int = 200) -> str:
    """The last ``lines`` lines of the job's output."""
    if record.where == "ray":
        from clearsight.workers.jobs import client

        text = client(record.address or "").get_job_logs(record.id)
    else:
        try:
            text = Path(record.log or "").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
    return "\n".join(text.splitlines()[-lines:])


def stop_job(record: JobRecord) -> None:
    """Stop a running job (a local one's whole process group gets SIGTERM)."""
    if record.where == "ray":
        from clearsight.workers.jobs import client

        client(record.address or "").stop_job(record.id)
        return
    if record.pid and _local_exit(record.pid) is None:
        try:
            os.killpg(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def form_systems(text: str) -> list[str]:
    """The form's systems text: one per line or separated by spaces (a system's parameters hold commas)."""
    return text.split()


def as_json(job: EvalJob) -> str:
    return json.dumps(json.loads(job.model_dump_json(exclude_unset=True)), indent=2)
