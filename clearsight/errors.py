"""Errors users see: one line naming the problem and the fix, never a deep traceback."""

from __future__ import annotations


class ClearsightError(Exception):
    """Base class of every error clearsight raises on purpose."""


class InputError(ClearsightError, ValueError):
    """Bad user input: a file, a field, a name. The message says what and how to fix it."""


class ModelNotFoundError(InputError):
    """The model source is neither a builtin, a local path, nor in the local HF cache."""


def pydantic_message(exc: Exception, what: str) -> str:
    """Squash a pydantic ValidationError into one line: 'what: field: message; field: message'."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        return f"{what}: {exc}"
    parts = []
    for err in errors():
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            msg = "unknown parameter"
        parts.append(f"{loc}: {msg}" if loc else msg)
    return f"{what}: " + "; ".join(parts)


class EngineBusy(ClearsightError):
    """The engine's queue is full: the request was not accepted (retry later or raise ``max_queue``)."""


class EngineClosed(ClearsightError):
    """The engine was closed: a request still in flight ends with this, and ``submit`` refuses new ones."""


class RequestCancelled(ClearsightError):
    """The request was cancelled by its caller before it finished."""
