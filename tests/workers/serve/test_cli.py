"""``clearsight serve``: bad options end in one ``error:`` line with exit status 2 (before Ray starts); the
server prints its URL and a curl example, warns when bound beyond loopback without a key, and shuts down
cleanly on SIGINT / SIGTERM. (The real start is ``app.start``, exercised by test_ray_serve.py's fixture.)"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from clearsight.cli import main

app = pytest.importorskip("clearsight.workers.app")


@pytest.mark.parametrize(("argv", "named"), [
    (["--port", "0"], "--port"),
    (["--port", "70000"], "--port"),
    (["--replicas", "0"], "--replicas"),
    (["--gpus-per-replica", "-1"], "--gpus-per-replica"),
    (["--model", "demo="], "--model"),
    (["--model", "a=builtin:shapes-llava", "--model", "a=builtin:tiny-llava"], "unique"),
    (["--model", " "], "--model"),
    (["--max-tokens", "0"], "max_tokens"),
    (["--replicas", "3", "--max-replicas", "2"], "max_replicas"),
    (["--api-key", " "], "--api-key"),
])
def test_bad_options_one_line_exit_2(argv, named, capsys, monkeypatch):
    monkeypatch.setattr(app, "start", lambda *a, **k: pytest.fail("Ray must not start on bad input"))
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_prints_url_warns_and_stops_on_signal(sig, capsys, monkeypatch):
    calls = []

    def fake_start(config, *, host, port, address=None, **kw):
        calls.append(("start", host, port, address, [m.name for m in config.models]))
        # the signal arrives once the server is up, as a Ctrl-C would
        threading.Timer(0.2, os.kill, (os.getpid(), sig)).start()
        return f"http://{host}:{port}"

    monkeypatch.setattr(app, "start", fake_start)
    monkeypatch.setattr(app, "stop", lambda: calls.append(("stop",)))
    monkeypatch.delenv("CLEARSIGHT_API_KEY", raising=False)
    before = signal.getsignal(sig)
    assert main(["serve", "--host", "0.0.0.0", "--port", "8123", "--model", "demo=builtin:shapes-llava"]) == 0
    out, err = capsys.readouterr()
    assert calls == [("start", "0.0.0.0", 8123, None, ["demo"]), ("stop",)]
    assert "http://0.0.0.0:8123" in out and "curl http://0.0.0.0:8123/v1/chat/completions" in out
    assert '"model": "demo"' in out
    assert "WARNING" in err and "API key" in err
    assert signal.getsignal(sig) == before  # the handlers are put back


def test_key_from_environment_and_no_warning_on_loopback(capsys, monkeypatch):
    seen = {}

    def fake_start(config, *, host, port, address=None, **kw):
        seen["key"] = config.settings.api_key
        threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
        return f"http://{host}:{port}"

    monkeypatch.setattr(app, "start", fake_start)
    monkeypatch.setattr(app, "stop", lambda: None)
    monkeypatch.setenv("CLEARSIGHT_API_KEY", "from-env")
    assert main(["serve", "--host", "0.0.0.0"]) == 0
    out, err = capsys.readouterr()
    assert seen["key"] == "from-env" and "WARNING" not in err
    assert 'Authorization: Bearer $CLEARSIGHT_API_KEY' in out
    assert app.loopback_warning("127.0.0.1", None) is None


def test_serve_run_builder_validates_its_args():
    from pydantic import ValidationError

    built = app.app_builder({"models": "a=builtin:shapes-llava,b=builtin:shapes-llava", "replicas": 2})
    assert built is not None
    with pytest.raises(ValidationError):
        app.app_builder({"models": "a=x,a=y"})
    with pytest.raises(ValidationError):
        app.app_builder({"replica": 2})


def test_replicas_fixed_or_autoscaled():
    fixed = app.ServedModel(name="a", source="builtin:shapes-llava", replicas=2, gpus_per_replica=0.5)
    opts = fixed.deployment_options(0)
    assert opts["num_replicas"] == 2 and "autoscaling_config" not in opts
    assert opts["ray_actor_options"]["num_gpus"] == 0.5 and opts["name"] == "model-0"
    auto = app.ServedModel(name="a", source="builtin:shapes-llava", replicas=1, max_replicas=4).deployment_options(3)
    assert "num_replicas" not in auto and auto["name"] == "model-3"
    assert auto["autoscaling_config"]["min_replicas"] == 1 and auto["autoscaling_config"]["max_replicas"] == 4
    # the GPU share decides the device unless one is given
    assert fixed.spec().device == "cuda" and app.ServedModel(name="a", source="x").spec().device == "cpu"
