"""The output folder of an eval run: path checks and the run lock.

One run writes into a folder at a time. ``output_lock`` holds an exclusive ``fcntl.flock`` on
``<folder>/.lock`` for the whole run; a second run (or ``clearsight report``) into the same folder is
refused at once with a one-line error naming the holder (pid, host, start time, written into the file).
The kernel releases a ``flock`` when its holder exits in any way, SIGKILL included, so a lock left by a
dead run never blocks the next one: the file may stay, the lock does not. Locks are advisory and local:
they only coordinate clearsight runs, and on network filesystems without ``flock`` support they are
only as good as that filesystem's emulation.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clearsight.evals.errors import EvalInputError

LOCK_NAME = ".lock"


class FolderInUseError(EvalInputError):
    """Another run holds the output folder's lock."""


def check_output_path(path: str | os.PathLike[str], flag: str = "--output") -> Path:
    """Refuse an output path that is a file, or lies under one, before anything is written."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise EvalInputError(f"{flag} '{path}' is a file, not a folder: choose another {flag} (or remove the file)")
    for parent in p.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise EvalInputError(f"{flag} '{path}' cannot be created: '{parent}' is a file, not a folder: "
                                     f"choose another {flag}")
            break
    return p


def _holder_text(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        where = f" on {info['host']}" if info.get("host") else ""
        return f"pid {int(info['pid'])}{where}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):  # being written, or emptied by a run that is ending
        return "holder unknown"


def _describe_self() -> bytes:
    info = {"pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
            "command": " ".join(sys.argv)[:500]}
    return (json.dumps(info) + "\n").encode("utf-8")


@contextmanager
def output_lock(path: str | os.PathLike[str], *, create: bool = True, flag: str = "--output",
                fix: str = "wait for it or choose another --output",
                unwritable_fix: str = "choose another --output") -> Iterator[Path]:
    """Hold the folder's run lock for the ``with`` block (creating the folder when ``create``).

    Raises ``FolderInUseError`` at once when another run holds it, and a one-line ``EvalInputError`` when
    the folder cannot be created or written. A folder this call created and that holds nothing but the
    lock file when the block ends (a run that failed before writing anything) is removed again.
    """
    folder = check_output_path(path, flag)
    made = []  # folders this call created, deepest last
    if create:
        for parent in reversed([folder, *folder.absolute().parents]):
            if not parent.exists():
                made.append(parent)
    lock_path = folder / LOCK_NAME
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):  # files in it may be writable, the folder is not
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
        fd = _acquire(lock_path, folder, fix)
    except FolderInUseError:
        raise
    except OSError as exc:
        _remove_empty(made)
        raise EvalInputError(f"output folder '{folder}' is not writable ({exc.strerror or exc}): "
                             f"{unwritable_fix}") from None
    except BaseException:
        _remove_empty(made)
        raise
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, _describe_self(), 0)
        except OSError as exc:  # e.g. a full disk: the lock itself is held, say so and stop
            raise EvalInputError(f"output folder '{folder}' is not writable ({exc.strerror or exc}): "
                                 f"{unwritable_fix}") from None
        yield folder
    finally:
        try:
            if made and _only_lock_left(folder):
                os.unlink(lock_path)  # still locked: a run starting now re-checks the inode and retries
                _remove_empty(made)
            else:
                os.ftruncate(fd, 0)  # the folder is free: no stale holder to report
        except OSError:
            pass
        finally:
            os.close(fd)  # releases the lock


def _acquire(lock_path: Path, folder: Path, fix: str) -> int:
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _holder_text(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise FolderInUseError(f"output folder '{folder}' is in use by another run ({holder}): {fix}") from None
            raise
        try:
            current = os.stat(lock_path)
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)  # locked a lock file that its last holder removed as it ended: lock the current one


def _only_lock_left(folder: Path) -> bool:
    return [p.name for p in folder.iterdir()] == [LOCK_NAME]


def _remove_empty(folders: list[Path]) -> None:
    for f in reversed(folders):
        try:
            f.rmdir()
        except OSError:
            return
