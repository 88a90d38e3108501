"""Eval jobs on a Ray cluster through Ray's Job Submission API: ``clearsight eval submit|status|logs|stop``.

``submit`` checks the job file here (bad input never reaches the cluster), then asks the cluster's
dashboard (``--address``, default ``$RAY_API_SERVER_ADDRESS`` or http://127.0.0.1:8265) to run
``<this python> -m clearsight eval run JOB`` on its head node: this interpreter by its absolute path,
because ``python`` in an entrypoint resolves with the PATH of the ``ray start`` process (the measured
pitfall of shared/reference/serving.md section 3.1). The job file and the output folder are passed
as absolute paths, so they must be on a filesystem the head node sees (the same machine, or a shared
one). The job's metadata records its output folder; ``status`` reads the run's ``progress.json`` there.

Token authentication (Ray 2.60 turns it on for local clusters): the Job SDK reads ``~/.ray/auth_token``
when ``RAY_AUTH_MODE=token`` is set in this environment (serving.md section 3.2).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from clearsight.evals.cli import add_run_options, eval_command, job_with_overrides
from clearsight.evals.errors import EvalInputError
from clearsight.evals.progress import read_progress, summary

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# passed on to the job (and its workers) when set here: where the code and the builtin data live
PASSED_ENV = ("PYTHONPATH", "CLEARSIGHT_CACHE", "HF_HOME", "HF_HUB_OFFLINE")


def _address(args: argparse.Namespace) -> str:
    return args.address or os.environ.get("RAY_API_SERVER_ADDRESS") or DEFAULT_ADDRESS


def client(address: str) -> Any:
    """A JobSubmissionClient; an unreachable cluster is one line naming the address."""
    try:
        from ray.job_submission import JobSubmissionClient
    except ImportError as exc:
        raise EvalInputError(f"eval jobs need Ray ({exc}); install clearsight[serve]") from None
    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # noqa: BLE001 - ConnectionError, AuthenticationError, ...: one line either way
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EvalInputError(f"--address {address}: cannot reach a Ray dashboard ({first}); start a head with "
                             "`ray start --head` or pass the dashboard's address") from None


def _call(what: str, job_id: str, fn: Any, *a: Any) -> Any:
    try:
        return fn(*a)
    except RuntimeError as exc:  # the SDK's answer to an unknown id, and HTTP errors
        first = str(exc).strip().splitlines()[0]
        if "does not exist" in first or "404" in first:
            raise EvalInputError(f"{what}: no job {job_id!r} on this cluster; list them with `ray job list`") \
                from None
        raise EvalInputError(f"{what} {job_id}: {first}") from None


def submit(args: argparse.Namespace) -> str:
    # checked here: bad input ends before the cluster is asked (--address is the dashboard's, not the executor's)
    job = job_with_overrides(argparse.Namespace(**{**vars(args), "address": None}))
    job_file = Path(args.job).resolve()
    output = Path(job.output).resolve()
    cmd = [sys.executable, "-m", "clearsight", "eval", "run", str(job_file), "--output", str(output),
           "--no-progress"]
    if args.executor:
        cmd += ["--executor", args.executor]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.no_pack:
        cmd.append("--no-pack")
    env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    c = client(_address(args))
    return c.submit_job(entrypoint=shlex.join(cmd), submission_id=args.id,
                        runtime_env={"env_vars": env} if env else None,
                        metadata={"clearsight_output": str(output), "clearsight_job": str(job_file)})


def cmd_submit(args: argparse.Namespace) -> int:
    job_id = submit(args)
    print(job_id)
    print(f"follow it: clearsight eval status {job_id} / clearsight eval logs {job_id}", file=sys.stderr)
    return 0


def status(job_id: str, address: str) -> dict[str, Any]:
    c = client(address)
    info = _call("status", job_id, c.get_job_info, job_id)
    output = (info.metadata or {}).get("clearsight_output")
    return {"id": job_id, "status": str(info.status.value if hasattr(info.status, "value") else info.status),
            "message": info.message, "output": output,
            "progress": summary(read_progress(output)) if output else {}}


def cmd_status(args: argparse.Namespace) -> int:
    st = status(args.id, _address(args))
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"{st['id']}: {st['status']}" + (f" ({st['message']})" if st["message"] else ""))
    prog = st["progress"]
    if prog:
        print(f"{prog['state']}: {prog['done']}/{prog['total']} generations in {st['output']}")
        for name, p in prog["systems"].items():
            print(f"  {name}: {p['done']}/{p['total']}")
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    c = client(_address(args))
    sys.stdout.write(_call("logs", args.id, c.get_job_logs, args.id))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    c = client(_address(args))
    stopped = _call("stop", args.id, c.stop_job, args.id)
    print(f"{args.id}: {'stop requested' if stopped else 'not running'}")
    return 0


@eval_command
def add_job_commands(es: argparse._SubParsersAction) -> None:
    sub = es.add_parser("submit", help="run an EvalJob file as a Ray job on a cluster (Job Submission API)")
    sub.add_argument("job")
    add_run_options(sub, cluster_address=False)  # the job joins the cluster it runs on ($RAY_ADDRESS)
    sub.add_argument("--address", default=None,
                     help=f"the cluster's dashboard (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
    sub.add_argument("--id", default=None, help="submission id (default: Ray's)")
    sub.set_defaults(func=cmd_submit)
    for name, fn, text in (("status", cmd_status, "a submitted eval job's state and its progress per system"),
                           ("logs", cmd_logs, "a submitted eval job's output"),
                           ("stop", cmd_stop, "stop a submitted eval job (rerun or resubmit it to resume)")):
        p = es.add_parser(name, help=text)
        p.add_argument("id")
        p.add_argument("--address", default=None,
                       help=f"the cluster's dashboard (default: $RAY_API_SERVER_ADDRESS or {DEFAULT_ADDRESS})")
        if name == "status":
            p.add_argument("--json", action="store_true")
        p.set_defaults(func=fn)
