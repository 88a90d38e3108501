"""Installs are locked and honest, and normal use prints no deprecation warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"


def _locked() -> dict[str, Version]:
    pins = {}
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"{LOCK}: '{line}' is not NAME==VERSION"
        pins[canonicalize_name(m[1])] = Version(m[2])
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for items in project["optional-dependencies"].values():
        reqs += [Requirement(r) for r in items if not r.startswith("clearsight[")]
    return reqs


def test_lock_pins_every_dependency_within_the_pyproject_ranges():
    pins = _locked()
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is a dependency but not pinned in {LOCK.name}: run `make lock`"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{LOCK.name} pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"
        floors = [Version(s.version) for s in req.specifier if s.operator == ">="]
        # honest ranges: the lowest version allowed is the tested one (same major.minor as the lock's)
        assert floors and floors[0].release[:2] == pins[name].release[:2], \
            f"pyproject allows {req.name}{req.specifier} but {pins[name]} is what is tested: raise the floor"
    for tool in ("pip", "setuptools", "torch"):
        assert tool in pins, f"{tool} must be pinned too (the Makefile installs it from the lock)"


def test_cli_prints_no_deprecation_warning(tmp_path, image_file):
    """Deprecation warnings are shown (PYTHONWARNINGS=default) and none appears in generate or an eval. Both
    commands run in one fresh interpreter (each through the CLI's ``main``, as ``python -m clearsight`` does):
    what a second start-up would add is the same imports again."""
    env = {**os.environ, "PYTHONWARNINGS": "default"}
    runs = [
        ["generate", "--image", str(image_file), "--prompt", "what is it?", "-m", "vcd", "-m", "pai",
         "--max-new-tokens", "3"],
        ["eval", "pope", "--model", "builtin:tiny-llava", "--limit", "1", "--splits", "random",
         "--output", str(tmp_path / "pope"), "--no-progress"],
    ]
    script = ("import sys\nfrom clearsight.cli import main\n"
              f"for argv in {runs!r}:\n    rc = main(argv)\n    print('rc', rc, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    assert re.findall(r"^rc (\d+)$", out.stderr, re.MULTILINE) == ["0", "0"], out.stderr
    assert (tmp_path / "pope" / "results.json").is_file()
    assert not re.search(r"deprecat|FutureWarning", out.stderr, re.IGNORECASE), out.stderr
