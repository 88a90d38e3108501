"""Fixtures only. Helpers live in importable modules with unique names (tinyworld.py,
kernels/plan_cases.py): `from conftest import ...` breaks when several conftest files exist."""

from __future__ import annotations

import os
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    # CPU: Triton kernels run under the interpreter; it is read when a kernel is defined, so set it
    # before anything imports clearsight.kernels.triton_attention
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from tinyworld import make_image

torch.set_num_threads(2)


@pytest.fixture
def module():
    """Stands in for a transformers attention module (layer 1, GQA 4 heads over 2 kv heads)."""
    from plan_cases import HKV, H

    return SimpleNamespace(layer_idx=1, num_key_value_groups=H // HKV, is_causal=True)


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "scene.png"
    make_image(0).save(path)
    return path
