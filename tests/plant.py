"""Planting a bug for a test of a test: re-create a function from its source with one edit.

A test of a test patches a plausible one-line bug into the real code (``monkeypatch``) and checks that the
oracle test it guards then fails. The edit is made on the function's current source, so the planted bug
follows the code as it changes; if the text to replace is gone, ``plant`` fails loudly instead of silently
testing nothing.
"""

from __future__ import annotations

import inspect
import sys
import textwrap
from typing import Any

import pytest


def plant(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, old: str, new: str,
          also: tuple[Any, ...] = ()) -> None:
    """Replace ``owner.name`` (a module function or a class's method) by a copy whose source has ``old``
    replaced by ``new`` (exactly one occurrence). ``also``: more modules that imported the function by name."""
    func = inspect.unwrap(getattr(owner, name))
    src = textwrap.dedent(inspect.getsource(func))
    assert src.count(old) == 1, f"planting a bug in {name}: {old!r} occurs {src.count(old)} times, expected once"
    namespace: dict[str, Any] = dict(vars(sys.modules[func.__module__]))
    exec(compile(src.replace(old, new), f"<planted {name}>", "exec"), namespace)  # noqa: S102
    mutant = namespace[name]
    if isinstance(inspect.getattr_static(owner, name), staticmethod | classmethod):
        mutant = type(inspect.getattr_static(owner, name))(mutant)
    monkeypatch.setattr(owner, name, mutant)
    for module in also:
        monkeypatch.setattr(module, name, mutant)
