"""One shared inflect engine, created on first use (importing inflect costs seconds)."""

from __future__ import annotations

from functools import cache


@cache
def inflect_engine():
    import inflect

    return inflect.engine()
