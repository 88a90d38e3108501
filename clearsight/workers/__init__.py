"""Workers: models on Ray Serve behind an OpenAI-compatible HTTP API (``app``, ``api``, ``clearsight serve``),
and ``Client``, a server with the Engine's ``generate`` / ``stream``. Names are imported on first use, so
importing the package needs neither Ray nor FastAPI."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {"Client": "clearsight.workers.client", "ServerUnavailable": "clearsight.workers.client"}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clearsight.workers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
