"""Fixtures shared by the eval tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory):
    """One shapes world for the whole session (and its subprocesses), generated on first use."""
    root = tmp_path_factory.mktemp("shapes-cache")
    old = os.environ.get("CLEARSIGHT_CACHE")
    os.environ["CLEARSIGHT_CACHE"] = str(root)
    yield root
    if old is None:
        os.environ.pop("CLEARSIGHT_CACHE")
    else:
        os.environ["CLEARSIGHT_CACHE"] = old
