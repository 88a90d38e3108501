"""Where the checkpoints shipped inside the package live (no transformers import: the eval runner
identifies the shipped weights without loading them)."""

from __future__ import annotations

from pathlib import Path


def shapes_llava_path() -> Path:
    return Path(__file__).parent / "weights" / "shapes-llava"
