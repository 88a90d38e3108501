"""The README's examples run: every ```python block, and the cheap command-line lines."""

from __future__ import annotations

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
def test_python_examples_run(doc, index, code, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    exec(compile(code, f"{doc} python block {index}", "exec"), {})


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
def test_readme_cli_lines_run(line, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = shlex.split(line)[1:]
    assert main(argv) == 0, capsys.readouterr().err
