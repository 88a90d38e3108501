"""``<output>/progress.json``: how far a run's generation stage is, per system, for ``clearsight eval status``
and dashboards (which read files, never the running process).

Rewritten atomically (temp file + rename, ``clearsight.evals._io``), so a reader sees the previous or the
next state, never a torn one; at most every ``interval`` seconds while generating (a rewrite per record
would cost an fsync per record), and always at a change of state. First written with the first record,
so that a run failing before it leaves a fresh folder empty (and removed, see ``outdir``).
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from clearsight.evals._io import atomic_write_text

PROGRESS_FILE = "progress.json"
State = Literal["generating", "scoring", "done", "failed"]


class SystemProgress(BaseModel):
    done: int = 0
    total: int = 0


class Progress(BaseModel):
    """The file's schema."""

    state: State = "generating"
    systems: dict[str, SystemProgress] = Field(default_factory=dict)
    executor: str = "local"
    pid: int = Field(default_factory=os.getpid)
    host: str = Field(default_factory=socket.gethostname)
    started: float = Field(default_factory=time.time)
    updated: float = Field(default_factory=time.time)

    @property
    def done(self) -> int:
        return sum(s.done for s in self.systems.values())

    @property
    def total(self) -> int:
        return sum(s.total for s in self.systems.values())

    def describe(self) -> str:
        lines = [f"{self.state}: {self.done}/{self.total} generations"]
        lines += [f"  {name}: {s.done}/{s.total}" for name, s in self.systems.items()]
        return "\n".join(lines)


class ProgressFile:
    def __init__(self, folder: str | os.PathLike[str], totals: dict[str, int], done: dict[str, int],
                 executor: str = "local", interval: float = 0.5) -> None:
        self.path = Path(folder) / PROGRESS_FILE
        self.interval = interval
        self.progress = Progress(executor=executor, systems={
            name: SystemProgress(done=done.get(name, 0), total=total) for name, total in totals.items()})
        self._last = 0.0
        self._written = False  # first written with the first record: a run that fails before leaves no file


    def extend(self, system: str, total: int, done: int = 0) -> None:
        """Count ``total`` more generations of ``system`` (a later round of work, e.g. CrossCheck's checks)."""
        entry = self.progress.systems.setdefault(system, SystemProgress())
        entry.total += total
        entry.done += done

    def add(self, system: str, n: int = 1) -> None:
        self.progress.systems[system].done += n
        if time.monotonic() - self._last >= self.interval:
            self.write()

    def set_state(self, state: State) -> None:
        self.progress.state = state
        if self._written or state != "failed":
            self.write()

    @staticmethod
    def finish(folder: str | os.PathLike[str]) -> None:
        """Mark the folder's run done (after its last write)."""
        progress = read_progress(folder)
        if progress is not None:
            progress.state = "done"
            progress.updated = time.time()
            atomic_write_text(Path(folder) / PROGRESS_FILE, progress.model_dump_json(indent=2))

    def write(self) -> None:
        self.progress.updated = time.time()
        atomic_write_text(self.path, self.progress.model_dump_json(indent=2))
        self._last = time.monotonic()
        self._written = True


def read_progress(folder: str | os.PathLike[str]) -> Progress | None:
    """The folder's progress, or None when no run has written one (or it cannot be read)."""
    path = Path(folder) / PROGRESS_FILE
    try:
        return Progress.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def summary(progress: Progress | None) -> dict[str, Any]:
    """The JSON form ``status`` prints."""
    if progress is None:
        return {}
    return {"state": progress.state, "done": progress.done, "total": progress.total,
            "systems": {k: v.model_dump() for k, v in progress.systems.items()}}
