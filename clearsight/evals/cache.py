"""Generation cache: one JSON line per (system, sample) output, keyed by a stable hash.

Why this design (shared/evals.md, "Stages"; reference/evals.md section 6, point 2): generation is the
expensive step, scoring must be re-runnable without a GPU, and a killed run must lose at most the record
that was being written and never duplicate one. So each record is appended as one line (one ``write``
on an ``O_APPEND`` descriptor) and fsynced; on reload a truncated/invalid *last* line (the record being
written when the process died) is reported and dropped so that sample is regenerated, while a malformed
line *in the middle* means the file was edited or corrupted and is an error naming the file and line
number. One writer at a time: the eval runner holds the output folder's lock (``clearsight.evals.outdir``).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clearsight.evals._io import canonical_json, sha256_text
from clearsight.evals.errors import EvalInputError


def cache_key(system_config: Mapping[str, Any], sample_id: str | int,
              inputs: Mapping[str, Any] | None = None) -> str:
    """Stable key: sha256 of the canonical JSON of ``{"system": config, "sample_id": id}``, plus
    ``"inputs"`` when given (what the output depends on that the id does not name: the image's digest).

    Canonical JSON (sorted keys, no whitespace) makes the key independent of dict order, so the same
    system + sample always maps to the same key across runs and machines.
    """
    body = {"system": dict(system_config), "sample_id": sample_id}
    if inputs:
        body["inputs"] = dict(inputs)
    return sha256_text(canonical_json(body))


@dataclass(frozen=True)
class DroppedTail:
    """What ``load`` dropped: the 1-based line number and the first bytes of the bad last line."""

    line_number: int
    preview: str


class GenerationCache:
    """Append-only JSON-lines cache of generated outputs.

    >>> cache = GenerationCache("gen.jsonl")                                # doctest: +SKIP
    >>> cache.put({"model": "demo", "decode": "greedy"}, "bench/1", "Yes.")  # doctest: +SKIP
    True
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._records: dict[str, dict[str, Any]] = {}
        self._good_size = 0  # byte offset where the last valid line ends
        self._needs_newline = False
        self.dropped_tail: DroppedTail | None = None
        self.load()

    # ------------------------------------------------------------------ reading
    def load(self) -> dict[str, dict[str, Any]]:
        """(Re)read the file. Returns ``{key: record}``; see the module docstring for the error policy."""
        self._records = {}
        self._good_size = 0
        self._needs_newline = False
        self.dropped_tail = None
        if not self.path.exists():
            return self._records
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        # ``split`` leaves a final empty element when the file ends with a newline.
        offset = 0
        n_lines = len(lines) if lines[-1] else len(lines) - 1
        for i in range(n_lines):
            raw = lines[i]
            is_last = i == n_lines - 1
            record = self._parse(raw)
            if record is None:
                if is_last:
                    # The record being written when the run was killed: drop it so it is redone.
                    self.dropped_tail = DroppedTail(i + 1, raw[:80].decode("utf-8", "replace"))
                    warnings.warn(
                        f"{self.path}: dropped truncated/invalid last line {i + 1}; that sample will be "
                        "generated again",
                        stacklevel=2,
                    )
                    break
                raise EvalInputError(
                    f"{self.path}: line {i + 1} is not a valid cache record (malformed JSON or missing "
                    "'key'); the file was corrupted or edited: fix or delete that line"
                )
            if record["key"] in self._records:
                raise EvalInputError(f"{self.path}: line {i + 1} duplicates key {record['key'][:12]}...; "
                                     "delete the duplicate line")
            self._records[record["key"]] = record
            offset += len(raw) + 1
            if is_last and not data.endswith(b"\n"):
                # A complete JSON record whose newline was lost: keep it, add the newline before appending.
                offset -= 1
                self._needs_newline = True
        self._good_size = offset
        return self._records

    @staticmethod
    def _parse(raw: bytes) -> dict[str, Any] | None:
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(record, dict) or not isinstance(record.get("key"), str):
            return None
        return record

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, key: object) -> bool:
        return key in self._records

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._records.values())

    def has(self, system_config: Mapping[str, Any], sample_id: str | int,
            inputs: Mapping[str, Any] | None = None) -> bool:
        return cache_key(system_config, sample_id, inputs) in self._records

    def get(self, system_config: Mapping[str, Any], sample_id: str | int,
            inputs: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
        return self._records.get(cache_key(system_config, sample_id, inputs))

    def outputs(self, system_config: Mapping[str, Any]) -> dict[str | int, str]:
        """All cached outputs of one system as ``{sample_id: output}`` (the input the scorers take)."""
        want = canonical_json(dict(system_config))
        return {r["sample_id"]: r["output"] for r in self._records.values()
                if canonical_json(r.get("system")) == want}

    # ------------------------------------------------------------------ writing
    def put(self, system_config: Mapping[str, Any], sample_id: str | int, output: Any,
            inputs: Mapping[str, Any] | None = None, **meta: Any) -> bool:
        """Append one record, flushed + fsynced. Returns False (and writes nothing) if already cached."""
        key = cache_key(system_config, sample_id, inputs)
        if key in self._records:
            return False
        record = {"key": key, "system": dict(system_config), "sample_id": sample_id, "output": output, **meta}
        if inputs:
            record["inputs"] = dict(inputs)
        line = (canonical_json(record) + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        try:
            if self.dropped_tail is not None:
                # Cut the dropped partial last line before appending, or the new record would be glued
                # onto it and turn into mid-file corruption.
                os.ftruncate(fd, min(self._good_size, os.fstat(fd).st_size))
            if self._needs_newline:
                line = b"\n" + line
            # One write of the whole line on an O_APPEND descriptor: the kernel places it at the end of the
            # file in one piece, so even two writers (which the run lock prevents) could not interleave
            # inside a record.
            view = memoryview(line)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._needs_newline = False
        self._good_size += len(line)
        self.dropped_tail = None
        self._records[key] = record
        return True
