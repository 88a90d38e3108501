"""Fixtures of the serving tests: the demo model's Engine, one per session (the in-process oracle and the
backend of the in-process API), and the example image."""

from __future__ import annotations

import pytest
from PIL import Image

from clearsight.engine import Engine

from .servehelp import EXAMPLE, MODEL, T, data_url


@pytest.fixture(scope="session")
def engine():
    eng = Engine(MODEL)
    yield eng
    eng.close(timeout=T)


@pytest.fixture(scope="session")
def example_image() -> Image.Image:
    return Image.open(EXAMPLE).convert("RGB")


@pytest.fixture(scope="session")
def example_url(example_image) -> str:
    return data_url(example_image)
