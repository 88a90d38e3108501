"""Small I/O helpers shared by the evaluation modules: hashing, canonical JSON, atomic writes.

Atomic writes (temp file in the same folder + ``os.replace``) guarantee that a crash never leaves a
half-written results file behind: readers see either the old file or the complete new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from clearsight.evals.errors import EvalInputError


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (recorded with every result for provenance)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, NaN rejected (NaN is not valid JSON)."""
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise EvalInputError(f"value is not canonical-JSON serialisable ({exc}); use plain str/int/float/"
                             "bool/list/dict values without NaN") from exc


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder, fsync, ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file private (0600): keep the old file's mode, or 0644 for a new one
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, allow_nan=False) + "\n")


def require_file(path: str | os.PathLike[str], what: str, fix: str) -> Path:
    """Return ``Path(path)`` or raise a one-line error naming the missing file and the fix."""
    p = Path(path)
    if not p.is_file():
        raise EvalInputError(f"{what} not found: {p}; {fix}")
    return p


def read_json_file(path: str | os.PathLike[str], what: str) -> Any:
    """Load one JSON document, turning a decode error into a one-line error with file and position."""
    p = require_file(path, what, "check the path")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise EvalInputError(f"{p}: malformed JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                             "fix or re-create the file") from exc
