"""Where the checkpoints shipped inside the package live (no transformers import: the eval runner
identifies the shipped weights without loading them)."""

from __future__ import annotations

from pathlib import Path

# the builtins whose weights ship in weights/<name>/ (plain save_pretrained folders); models.builtin lists them
# with no builder
SHIPPED = ("shapes-llava", "shapes-organism")


def shipped_path(name: str) -> Path:
    """The folder of the shipped checkpoint ``builtin:<name>`` (``name`` one of ``SHIPPED``)."""
    if name not in SHIPPED:
        raise KeyError(f"no shipped checkpoint named {name!r}; shipped: {', '.join(SHIPPED)}")
    return Path(__file__).parent / "weights" / name


def shipped_model_path(model: str) -> Path | None:
    """The folder of a ``builtin:`` model reference when it names shipped weights, else None."""
    name = model.removeprefix("builtin:")
    return shipped_path(name) if model.startswith("builtin:") and name in SHIPPED else None


def shapes_llava_path() -> Path:
    return shipped_path("shapes-llava")
