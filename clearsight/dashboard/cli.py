"""``clearsight dashboard``: the Streamlit app (``clearsight/dashboard/app.py``) on 127.0.0.1.

Registered with ``clearsight.cli.extra_command``; Streamlit is imported by the child process only, so
``clearsight --help`` stays fast. Arguments are checked here, before Streamlit starts: a bad one is the
usual one-line ``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from clearsight.cli import extra_command
from clearsight.errors import InputError


def settings_from_args(args: argparse.Namespace):
    from pydantic import ValidationError

    from clearsight.dashboard.settings import DashboardSettings
    from clearsight.errors import pydantic_message

    if not 0 < args.port < 65536:
        raise InputError(f"--port: {args.port} is not a TCP port: give 1 to 65535")
    runs = Path(args.runs)
    if runs.exists() and not runs.is_dir():
        raise InputError(f"--runs: {str(runs)!r} is a file, not a folder: give the folder of eval result folders")
    if args.model is not None and not args.model.strip():
        raise InputError("--model: empty: give a local checkpoint folder, a cached HF id or builtin:<name>")
    try:
        return DashboardSettings(model=args.model, url=args.url, api_key=args.api_key, runs=runs.resolve(),
                                 timeout=args.timeout)
    except ValidationError as exc:
        message = pydantic_message(exc, "dashboard options")
        for field in ("url", "timeout", "model", "runs"):
            message = message.replace(f" {field}: ", f" --{field}: ")
        raise InputError(message) from None


def streamlit_command(port: int) -> list[str]:
    """The ``streamlit run`` command line: loopback only, headless, no usage statistics."""
    app = Path(__file__).resolve().parent / "app.py"
    return [sys.executable, "-m", "streamlit", "run", str(app), "--server.address", "127.0.0.1",
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def cmd_dashboard(args: argparse.Namespace) -> int:
    settings = settings_from_args(args)
    try:
        import streamlit  # noqa: F401 - only to fail with the fix before starting a child
    except ImportError:
        raise InputError("the dashboard needs Streamlit: pip install 'clearsight[dashboard]'") from None
    env = {**os.environ, **settings.to_env()}
    print(f"clearsight dashboard: http://127.0.0.1:{args.port} ({settings.source}; results in {settings.runs})",
          file=sys.stderr)
    try:
        return subprocess.call(streamlit_command(args.port), env=env)
    except KeyboardInterrupt:
        return 130


@extra_command
def add_dashboard(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("dashboard", help="the Streamlit dashboard: compare mitigations, browse results, run jobs",
                       description="Run the Streamlit dashboard on 127.0.0.1 (docs/dashboard.md).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None,
                     help="model run in this process (local path, cached HF id, builtin:<name>; default: the demo "
                     "model)")
    src.add_argument("--url", default=None, help="a `clearsight serve` server to run the Compare page on instead")
    p.add_argument("--api-key", default=None, help="the server's API key (with --url)")
    p.add_argument("--runs", default="runs", help="folder of eval result folders (default: %(default)s)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds a Compare run may take (default: 120)")
    p.set_defaults(func=cmd_dashboard)
