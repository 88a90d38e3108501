"""Errors raised for bad evaluation input.

Every message is one line that names the offending file/field and says how to fix it, so that a user
running a benchmark sees the cause without reading a traceback.
"""

from __future__ import annotations

from clearsight.errors import InputError


class EvalInputError(InputError):
    """Bad input to an evaluation (missing file/image, malformed JSON line, unknown split, ...).

    Subclasses ``ValueError`` so callers that already catch ``ValueError`` keep working.
    """

    def __init__(self, message: str) -> None:
        # Keep the message on one line: multi-line errors get mangled in logs and progress bars.
        super().__init__(" ".join(str(message).split()))
