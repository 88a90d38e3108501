"""The README's examples run: every ```python block, and the cheap command-line lines; the mitigation
guides' python examples run in order; every image file an example names is shipped."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from clearsight.cli import main

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# documents whose python examples must run as written (the others' examples need real data)
RUNNABLE_DOCS = ("README.md", "docs/foundation.md")


def _blocks(lang: str, text: str = README) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, flags=re.S)


PY_BLOCKS = [(doc, i, block) for doc in RUNNABLE_DOCS
             for i, block in enumerate(_blocks("python", (ROOT / doc).read_text(encoding="utf-8")))]


@pytest.mark.parametrize(("doc", "index", "code"), PY_BLOCKS, ids=[f"{d}#{i}" for d, i, _ in PY_BLOCKS])
def test_python_examples_run_smoke(doc, index, code, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"{doc} python block {index}", "exec"), {})


# documents whose python blocks build on each other (the first loads the model): run in order, one namespace
SEQUENTIAL_DOCS = ("docs/mitigations.md", "docs/branch-mitigations.md")


@pytest.mark.parametrize("doc", SEQUENTIAL_DOCS)
def test_guide_examples_run_in_order_smoke(doc, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    namespace: dict = {}
    for i, block in enumerate(_blocks("python", (ROOT / doc).read_text(encoding="utf-8"))):
        exec(compile(block, f"{doc} python block {i}", "exec"), namespace)


def test_example_images_exist():
    """Every image an example passes to a model (``--image X``, ``{"prompt": ..., "image": "X"}``) is a file
    of the repository (dataset records such as ``{"image": "a.jpg", "objects": ...}`` are not examples)."""
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    pattern = re.compile(r"""(?:--image\s+|["']image["']:\s*["'])([^\s"']+)""")
    named = {(doc.name, m) for doc in docs for line in doc.read_text(encoding="utf-8").splitlines()
             if "--image" in line or '"prompt"' in line for m in pattern.findall(line)}
    assert named, "no example names an image: the pattern is stale"
    missing = sorted((doc, path) for doc, path in named if not (ROOT / path).is_file())
    assert not missing, f"examples name images that are not shipped: {missing}"


CHEAP = ("clearsight generate", "clearsight models", "clearsight mitigations")


def _cli_lines() -> list[str]:
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            cmd = line.split("#")[0].strip()
            if cmd.startswith(CHEAP):
                lines.append(cmd)
    return lines


@pytest.mark.parametrize("line", _cli_lines())
def test_readme_cli_lines_run_smoke(line, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(line)[1:]
    assert main(argv) == 0, capsys.readouterr().err


def _cluster_lines() -> list[str]:
    """docs/evals.md, "Running a job on a cluster": the lines that run the small example job."""
    text = (ROOT / "docs/evals.md").read_text(encoding="utf-8")
    section = text.split("### Running a job on a cluster", 1)[1].split("\n### ", 1)[0]
    return [line.split("#")[0].strip() for block in _blocks("bash", section) for line in block.splitlines()
            if "examples/ray_eval.toml" in line]


@pytest.mark.parametrize("line", _cluster_lines())
def test_evals_cluster_lines_run(line, tmp_path, monkeypatch, capsys):
    """On a local Ray this test's run starts (and stops); into a temporary folder instead of runs/."""
    pytest.importorskip("ray")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway local Ray: no token file
    argv = [*shlex.split(line)[1:], "--output", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "| none" in out and "| vcd" in out  # the report names both systems
    assert json.loads((tmp_path / "out" / "job.json").read_text())["executor"] == "ray"


# docs/evals.md sections whose python examples run as written (the others need real data files)
EVALS_RUNNABLE = ("## MME hallucination subsets", "## AMBER", "## Benchmarks as plug-ins",
                  "## Model-organism diagnostics")
# what their examples print, worked by hand (and written in the examples' comments). MME: answers
# Yes/No/Yes/Yes to yes/no/yes/no, accuracy 3/4; accuracy+ (both questions of an image right) 1/2 (only
# a.jpg); score 100 * (0.75 + 0.5). AMBER: "puppy", "cat", "grass" name dog, cat, grass; two are not in the
# truth (CHAIR 2/3), dog covered (Cover 1), cat covered among the hallu objects (Cog 1); the discriminative
# "No" is right (F1 1); AMBER score ((1 - 2/3) + 1) / 2.
EVALS_PRINTED = {"## MME hallucination subsets": [["yes", "no", "other"], [0.75, 0.5, 125.0]],
                 "## AMBER": [[2 / 3, 1.0, 1.0], [1.0, 2 / 3]]}


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    nxt = text.find("\n## ", start + len(heading))
    return text[start: nxt if nxt != -1 else len(text)]


@pytest.mark.parametrize("heading", EVALS_RUNNABLE)
def test_evals_guide_examples_run(heading, monkeypatch, capsys, tmp_path):
    """The MME and AMBER scoring examples and the plug-in benchmark example (it runs a tiny model on 2
    questions through the runner, and its section appears in the report)."""
    import clearsight.evals.benchmarks.base as base

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(base, "_REGISTRY", dict(base.registered()))  # the example's benchmark stays in this test
    blocks = _blocks("python", _section((ROOT / "docs/evals.md").read_text(encoding="utf-8"), heading))
    assert blocks, f"no python example under {heading!r}"
    for i, block in enumerate(blocks):
        code = block.replace("/tmp/clearsight-yes-rate", str(tmp_path / "yes-rate"))
        # dont_inherit: not this module's `from __future__ import annotations` (pydantic resolves real types)
        compiled = compile(code, f"docs/evals.md {heading} block {i}", "exec", dont_inherit=True)
        exec(compiled, {"__name__": "docs_example"})
    if heading.startswith("## Benchmarks"):
        assert "## Yes-rate" in (tmp_path / "yes-rate" / "report.md").read_text()
    elif heading in EVALS_PRINTED:  # the organism example prints measured figures of the shipped model
        printed = [line.replace("[", " ").replace("]", " ").replace(",", " ").replace("'", " ").split()
                   for line in capsys.readouterr().out.splitlines()]
        want = EVALS_PRINTED[heading]
        assert len(printed) == len(want), printed
        for got, line in zip(printed, want):
            assert [v if isinstance(v, str) else pytest.approx(v, abs=1e-9) for v in line] == \
                [w if isinstance(v, str) else float(w) for v, w in zip(line, got)] and len(got) == len(line), got
