"""The serving examples of README.md and docs/serving.md run: blocks fenced as ```bash serve and ```python serve
need a running server, so they run against one started here (the HTTP API over the demo model's Engine,
served by uvicorn on a free loopback port, no Ray: the examples test the API, test_ray_serve.py tests Serve).
Their ``http://127.0.0.1:8000`` is replaced by that server's URL."""

from __future__ import annotations

import re
import socket
import subprocess
import threading
import time

import pytest
import uvicorn

from clearsight.config import DEFAULT_MODEL
from clearsight.workers.api import build_app
from clearsight.workers.backend import EngineBackend

from .servehelp import ROOT, T

DOCS = ("README.md", "docs/serving.md")
URL = "http://127.0.0.1:8000"


def blocks(lang: str) -> list[tuple[str, int, str]]:
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text(encoding="utf-8")
        out += [(doc, i, b) for i, b in enumerate(re.findall(rf"```{lang} serve\n(.*?)```", text, flags=re.S))]
    return out


PYTHON, BASH = blocks("python"), blocks("bash")


def test_the_docs_have_serving_examples():
    assert len([b for b in PYTHON if b[0] == "README.md"]) >= 2 and [b for b in BASH if b[0] == "README.md"]
    assert all(URL in code for _, _, code in PYTHON + BASH)


@pytest.fixture(scope="module")
def server_url(engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app({DEFAULT_MODEL: EngineBackend(engine)})
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + T
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the example server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(T)
    assert not thread.is_alive()


@pytest.mark.parametrize(("doc", "index", "code"), PYTHON, ids=[f"{d}#{i}" for d, i, _ in PYTHON])
def test_python_serving_examples_run(doc, index, code, server_url, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    exec(compile(code.replace(URL, server_url), f"{doc} python serve block {index}", "exec"), {})
    assert capsys.readouterr().out.strip()  # each example prints what it got


@pytest.mark.parametrize(("doc", "index", "code"), BASH, ids=[f"{d}#{i}" for d, i, _ in BASH])
def test_bash_serving_examples_run(doc, index, code, server_url):
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", code.replace(URL, server_url)], cwd=ROOT,
                       capture_output=True, text=True, timeout=T)
    assert r.returncode == 0, r.stderr
    assert "chat.completion" in r.stdout and "builtin:shapes-llava" in r.stdout  # the answer and the model list
