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


ID_KEYS = ("id", "sample_id", "image_id", "question_id")
TEXT_KEYS = ("text", "caption", "answer", "response", "output")


def read_outputs_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Outputs generated elsewhere: JSON lines (or a JSON array) of objects with an id (``id``, ``sample_id``,
    ``image_id`` or ``question_id``) and a text (``text``, ``caption``, ``answer``, ``response`` or
    ``output``); returns ``{str(id): text}``. Errors name the file, the record and the fix."""
    p = require_file(path, "outputs file", "give a JSON-lines file of {\"id\": ..., \"text\": ...} records")
    raw = p.read_text(encoding="utf-8")
    if raw.lstrip().startswith("["):
        records = read_json_file(p, "outputs file")
    else:
        records = []
        for i, line in enumerate(raw.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise EvalInputError(f"{p}: line {i} is not JSON ({exc.msg}): fix that line") from None
    if not records:
        raise EvalInputError(f"{p}: no records: give one {{\"id\": ..., \"text\": ...}} object per line")
    out: dict[str, str] = {}
    for i, r in enumerate(records, start=1):
        key = next((k for k in ID_KEYS if isinstance(r, dict) and k in r), None)
        text = next((k for k in TEXT_KEYS if isinstance(r, dict) and k in r), None)
        if key is None or text is None or not isinstance(r[text], str):
            raise EvalInputError(f"{p}: record {i} needs an id ({', '.join(ID_KEYS)}) and a text "
                                 f"({', '.join(TEXT_KEYS)}) string")
        sid = str(r[key])
        if sid in out:
            raise EvalInputError(f"{p}: record {i} repeats id {sid!r}: give each sample once")
        out[sid] = r[text]
    return out
