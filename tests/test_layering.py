"""The layering rule of design.md, checked on the source: imports point down only.

    cli, workers, dashboard -> evals -> engine -> decoding -> mitigations, models -> kernels, config, errors

(design.md puts evals beside the engine and decoding beside mitigations and models; the order inside those
tiers is the one the code keeps: the evals executor runs on the Engine, the engine on decoding's batches, and
decoding runs the mitigations, which reach the model for their probes through ``RequestContext.probe``,
never by importing decoding.) Every ``import`` of a ``clearsight`` module in every module under
``clearsight/`` counts: at the top, inside functions (lazy) and under ``TYPE_CHECKING`` alike. Modules of the
same tier may import each other. The package facade (``clearsight/__init__.py``, lazy) and ``__main__`` sit
above everything; ``from clearsight import name`` counts as an import of the module that defines ``name``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import clearsight

PACKAGE = Path(__file__).resolve().parents[1] / "clearsight"

TIERS: list[set[str]] = [
    {"errors", "config", "kernels"},
    {"models", "mitigations"},
    {"decoding"},
    {"engine"},
    {"evals"},
    {"cli", "workers", "dashboard"},
    {"__init__", "__main__"},  # the public facade and ``python -m clearsight``
]
RANK = {layer: i for i, tier in enumerate(TIERS) for layer in tier}

# (importing file, imported module, imported name or None for ``import x``) -> why it is allowed.
ALLOWED = {
    ("evals/cli.py", "clearsight.cli", "extra_command"):
        "the documented CLI plug-in point: the `eval` subcommand registers itself with clearsight.cli.extra_command, "
        "so that cli.py imports no evals code to build its parser (fast --help, and the CLI works without the "
        "evals' optional dependencies); cli.py loads evals/cli.py by name (_load_extra_commands)",
    ("evals/cli.py", "clearsight.cli", "add_model_arguments"):
        "the same plug-in: the registered `eval` subcommand takes the model options every subcommand shares",
}

# Imports that break the rule today (older than this test); each names its fix. New ones fail the test. Unlike
# ALLOWED, an entry that no longer occurs does not fail: remove it when its fix lands.
KNOWN_VIOLATIONS = {
    ("models/shapes_llava.py", "clearsight.evals.datasets.shapes", "COLOURS"):
        "the shapes world's vocabulary belongs below both (e.g. models/shapes_world.py, re-exported by evals)",
    ("models/shapes_llava.py", "clearsight.evals.datasets.shapes", "SHAPES"): "as COLOURS",
    ("models/shapes_llava.py", "clearsight.evals.datasets.pope", "build_prompt"):
        "the POPE prompt template used to train the shapes model: move it below models with the vocabulary",
    ("models/shapes_llava.py", "clearsight.evals.datasets.pope", "question_text"): "as build_prompt",
}


def layer_of(module: str) -> str | None:
    """The layer of a ``clearsight`` module name (None outside the package)."""
    parts = module.split(".")
    if parts[0] != "clearsight":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def defining_module(module: str, name: str | None) -> str:
    """``from clearsight import name`` -> the module the facade takes ``name`` from."""
    if module != "clearsight" or name is None:
        return module
    if name == "__version__":
        return "clearsight.config"  # package metadata, read without importing any layer
    return clearsight._EXPORTS.get("load_model" if name == "load" else name, module)


def imports(source: str, module: str) -> list[tuple[str, str | None, int]]:
    """(imported module, name or None, line) of every clearsight import in ``source`` (module = its dotted name)."""
    out: list[tuple[str, str | None, int]] = []
    package = module if module.endswith("__init__") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out.extend((a.name, None, node.lineno) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                anchor = package.removesuffix(".__init__").split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            out.extend((base, a.name, node.lineno) for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) in
                   ("import_module", "__import__"))):
            out.append((node.args[0].value, None, node.lineno))
    return [(m, n, line) for m, n, line in out if layer_of(m) is not None]


def violations(rel: str, source: str) -> list[tuple[tuple[str, str, str | None], str]]:
    """Imports of ``source`` (file ``rel`` under clearsight/) that point up: ((rel, module, name), description)."""
    parts = rel.removesuffix(".py").split("/")
    module = ".".join(["clearsight", *parts])
    own = layer_of(module)
    assert own is not None
    out = []
    for imported, name, line in imports(source, module):
        target = layer_of(defining_module(imported, name))
        assert target is not None
        if RANK[target] > RANK[own]:
            what = f"{imported}" + (f" ({name})" if name else "")
            out.append(((rel, imported, name), f"clearsight/{rel}:{line}: {own} imports {target}: {what}"))
    return out


def sources() -> list[tuple[str, str]]:
    return [(p.relative_to(PACKAGE).as_posix(), p.read_text("utf-8")) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_layer_has_a_tier():
    layers = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
              if (p.is_file() and p.suffix == ".py") or (p / "__init__.py").is_file()}
    missing = layers - RANK.keys()
    assert not missing, f"place the new layer(s) {sorted(missing)} in TIERS (tests/test_layering.py) and design.md"


def test_imports_point_down_only():
    found = [v for rel, src in sources() for v in violations(rel, src)]
    bad = [desc for key, desc in found if key not in ALLOWED and key not in KNOWN_VIOLATIONS]
    assert not bad, "imports against the layering rule (design.md):\n" + "\n".join(bad)


def test_allowed_exceptions_are_still_needed():
    """A listed exception that no longer occurs is dropped from the list, so that it cannot come back unseen."""
    found = {key for rel, src in sources() for key, _ in violations(rel, src)}
    assert not (ALLOWED.keys() - found), f"no longer imported: {sorted(ALLOWED.keys() - found)}"


def test_mitigations_do_not_import_decoding():
    for rel, src in sources():
        if rel.startswith(("mitigations/", "models/", "kernels/")) or rel in ("config.py", "errors.py"):
            up = [desc for key, desc in violations(rel, src) if key not in KNOWN_VIOLATIONS]
            assert not up, up
            assert not any(layer_of(m) == "decoding" for m, _, _ in imports(src, "clearsight." + rel[:-3]))


@pytest.mark.parametrize(("rel", "source", "expected"), [
    ("mitigations/x.py", "def f():\n    from clearsight.decoding.generate import generate\n",
     "mitigations imports decoding"),
    ("mitigations/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import clearsight.engine\n",
     "mitigations imports engine"),
    ("mitigations/x.py", "from clearsight import generate\n", "mitigations imports decoding"),
    ("decoding/x.py", "from ..engine import Engine\n", "decoding imports engine"),
    ("models/x.py", "import importlib\nimportlib.import_module('clearsight.evals.runner')\n", "models imports evals"),
    ("engine.py", "from clearsight.evals import runner\n", "engine imports evals"),
])
def test_the_checker_finds_upward_imports(rel, source, expected):
    found = violations(rel, source)
    assert len(found) == 1 and expected in found[0][1]


@pytest.mark.parametrize("source", [
    "from clearsight.kernels.plan import AttentionPlan\nfrom clearsight.mitigations.base import Probe\n",
    "from clearsight import __version__\nfrom clearsight.models.loader import LVLM\n",
    "from .base import Mitigation\n",
])
def test_the_checker_allows_downward_imports(source):
    assert violations("mitigations/x.py", source) == []


def test_importing_mitigations_loads_no_decoding():
    code = ("import sys, clearsight.mitigations, clearsight.models.loader\n"
            "up = sorted(m for m in sys.modules if m.startswith(('clearsight.decoding', 'clearsight.engine', "
            "'clearsight.evals', 'clearsight.cli', 'clearsight.workers', 'clearsight.dashboard')))\n"
            "assert not up, up\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-2000:]
