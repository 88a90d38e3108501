"""Output folders (issue 11): one run writes into a folder at a time (a lock, refused at once, released on
any exit); a failed run leaves a finished folder byte-identical and reportable; bad eval input ends in
one line, exit status 2, with nothing written."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from clearsight.cli import DEFAULT_MODEL, build_parser, main
from clearsight.evals.cache import GenerationCache
from clearsight.evals.outdir import FolderInUseError, output_lock

TINY = "builtin:tiny-llava"
POPE = ["eval", "pope", "--model", TINY, "--limit", "2", "--splits", "random", "--no-progress"]
TIMEOUT = 600  # a hung subprocess fails the test instead of hanging the suite (not a speed assertion)


pytestmark = pytest.mark.usefixtures("shapes_cache")  # tests/evals/conftest.py: one world per session


@pytest.fixture(scope="module")
def finished_master(tmp_path_factory, shapes_cache):
    out = tmp_path_factory.mktemp("finished") / "out"
    assert main([*POPE, "--system", "none", "--output", str(out)]) == 0
    return out


@pytest.fixture
def finished(finished_master, tmp_path):
    """A finished output folder of its own (POPE random, 2 questions, system 'none')."""
    out = tmp_path / "finished"
    shutil.copytree(finished_master, out)
    return out


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _holder(folder: Path) -> str:
    info = json.loads((folder / ".lock").read_text())
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"


def _records(folder: Path) -> list[dict]:
    """Every line of the cache, each of which must parse (no torn or glued line)."""
    lines = (folder / "generations.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    return [json.loads(line) for line in lines[:-1]]


def _reported_systems(folder: Path) -> list[str]:
    return [s["name"] for s in json.loads((folder / "results.json").read_text())["systems"]]


def _python(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


# ------------------------------------------------------------------------------------------- the lock
def test_run_and_report_are_refused_while_the_folder_is_locked(finished, capsys):
    before = _hashes(finished)
    with output_lock(finished):
        holder = _holder(finished)
        assert f"pid {os.getpid()} on " in holder
        rc, out, err = _cli(capsys, *POPE, "--system", "vcd", "--output", finished)
        assert (rc, out) == (2, "")
        assert err == (f"error: output folder '{finished}' is in use by another run ({holder}): "
                       "wait for it or choose another --output\n")
        rc, out, err = _cli(capsys, "report", finished)
        assert (rc, out) == (2, "")
        assert err == (f"error: output folder '{finished}' is in use by another run ({holder}): "
                       "wait for it to finish, then report again\n")
    assert _hashes(finished) == before
    rc, out, _ = _cli(capsys, "report", finished)
    assert rc == 0 and "| none |" in out


HOLD = textwrap.dedent("""
    import sys
    from clearsight.evals.outdir import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()
""")


def test_lock_of_a_killed_holder_never_blocks(tmp_path):
    out = tmp_path / "out"
    holder = _python("-c", HOLD, str(out), stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == "locked\n", holder.stderr.read()
        with pytest.raises(FolderInUseError, match=f"in use by another run \\(pid {holder.pid} on "):
            with output_lock(out):
                pass
        holder.kill()  # SIGKILL: no clean-up runs, the kernel drops the lock
        holder.wait()
        assert (out / ".lock").exists()  # the file stays, the lock does not
        with output_lock(out):
            assert _holder(out).startswith(f"pid {os.getpid()} ")
    finally:
        _stop(holder)


PAUSED_RUN = textwrap.dedent("""
    import pathlib, sys, time
    from clearsight.evals import cache
    gate = pathlib.Path(sys.argv[1])
    put = cache.GenerationCache.put

    def paused_put(self, *args, **kwargs):  # stop after the first record until the test opens the gate
        written = put(self, *args, **kwargs)
        print("wrote", flush=True)
        while not gate.exists():
            time.sleep(0.02)
        return written

    cache.GenerationCache.put = paused_put
    from clearsight.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def test_second_run_is_refused_while_the_first_runs_then_adds_its_system(tmp_path, capsys):
    """Real processes, overlap guaranteed: the first run pauses (holding the lock) after its first record."""
    out, gate = tmp_path / "out", tmp_path / "gate"
    first = _python("-c", PAUSED_RUN, str(gate), *POPE, "--system", "none", "--output", str(out))
    try:
        assert first.stdout.readline() == "wrote\n", first.stderr.read()
        holder = _holder(out)
        assert holder.startswith(f"pid {first.pid} ")
        second = subprocess.run([sys.executable, "-m", "clearsight", *POPE, "--system", "vcd", "--output", str(out)],
                                capture_output=True, text=True, timeout=TIMEOUT)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr.splitlines()[-1] == (f"error: output folder '{out}' is in use by another run ({holder}): "
                                                  "wait for it or choose another --output")
        assert "Traceback" not in second.stderr
        gate.touch()
        _, err = first.communicate(timeout=TIMEOUT)
        assert first.returncode == 0, err
    finally:
        gate.touch()
        _stop(first)
    records = _records(out)
    assert [r["system_name"] for r in records] == ["none", "none"]
    assert _reported_systems(out) == ["none"]
    cache_before = (out / "generations.jsonl").read_bytes()
    # the refused run, again once the folder is free: its system joins the folder, nothing is lost
    rc, _, err = _cli(capsys, *POPE, "--system", "vcd", "--output", out)
    assert rc == 0, err
    assert (out / "generations.jsonl").read_bytes().startswith(cache_before)
    assert sorted(r["system_name"] for r in _records(out)) == ["none", "none", "vcd", "vcd"]
    assert _reported_systems(out) == ["none", "vcd"]
    assert [s["name"] for s in json.loads((out / "job.json").read_text())["systems"]] == ["none", "vcd"]
    rc, printed, _ = _cli(capsys, "report", out)
    assert rc == 0 and "| none |" in printed and "| vcd |" in printed


def test_two_simultaneous_runs_never_lose_or_tear_a_record(tmp_path):
    """Started together, whatever the timing: both succeed with all their records, or one is refused with
    exit status 2 and the other has all of its records; every line of the cache parses."""
    out = tmp_path / "out"
    procs = {name: _python("-m", "clearsight", *POPE, "--system", name, "--output", str(out))
             for name in ("none", "vcd")}
    try:
        results = {name: (p.communicate(timeout=TIMEOUT), p.returncode) for name, p in procs.items()}
    finally:
        _stop(*procs.values())
    ok = sorted(name for name, (_, rc) in results.items() if rc == 0)
    for (_, err), rc in results.values():
        assert rc in (0, 2), err
        if rc == 2:
            assert err.splitlines()[-1].startswith(f"error: output folder '{out}' is in use by another run (pid ")
            assert "Traceback" not in err
    assert ok, results
    by_system: dict[str, int] = {}
    for r in _records(out):
        by_system[r["system_name"]] = by_system.get(r["system_name"], 0) + 1
    assert by_system == dict.fromkeys(ok, 2)
    assert sorted(_reported_systems(out)) == ok


CACHE_WRITER = textwrap.dedent("""
    import pathlib, sys, time
    from clearsight.evals.cache import GenerationCache
    cache = GenerationCache(sys.argv[1])
    go = pathlib.Path(sys.argv[2])
    print("ready", flush=True)
    while not go.exists():
        time.sleep(0.01)
    for i in range(150):
        cache.put({"model": sys.argv[3]}, i, sys.argv[3] * 20000)
""")


def test_cache_appends_are_whole_lines_even_without_the_lock(tmp_path):
    """Belt and braces: each record is one write on an O_APPEND descriptor, so two writers (which the
    run lock prevents) still never glue or cut lines."""
    path, go = tmp_path / "gen.jsonl", tmp_path / "go"
    writers = [_python("-c", CACHE_WRITER, str(path), str(go), name) for name in ("a", "b")]
    try:
        for w in writers:
            assert w.stdout.readline() == "ready\n", w.stderr.read()
        go.touch()
        for w in writers:
            _, err = w.communicate(timeout=TIMEOUT)
            assert w.returncode == 0, err
    finally:
        _stop(*writers)
    lines = path.read_text().splitlines()
    assert len(lines) == 300
    assert sorted(json.loads(x)["output"][0] for x in lines) == ["a"] * 150 + ["b"] * 150
    assert len(GenerationCache(path)) == 300


# ------------------------------------------------------------------------------------------- a finished folder
def _folder_cases(tmp_path: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "coco_pope_random.json"
    empty.write_text("")
    return [
        ([*POPE, "--limit", "3", "--system", "none"],
         "output folder '{out}' holds the results of other benchmarks (pope limit is 2 there, 3 here): "
         "run the same benchmarks to add systems to it, or choose another --output"),
        (["eval", "chair", "--model", TINY, "--n-images", "1", "--max-new-tokens", "4", "--no-progress"],
         "output folder '{out}' holds the results of other benchmarks (it has pope, this run chair): "
         "run the same benchmarks to add systems to it, or choose another --output"),
        ([*POPE, "--system", "none=vcd"],
         "output folder '{out}' already has a system 'none' whose mitigations differ: give this one another "
         "name (--system LABEL=...) or choose another --output"),
        ([*POPE, "--system", "none", "--model", "builtin:tiny-llava-next"],
         "output folder '{out}' already has a system 'none' whose model differs: give this one another "
         "name (--system LABEL=...) or choose another --output"),
        ([*POPE, "--system", "none", "--sample"],
         "output folder '{out}' already has a system 'none' whose decode differs: give this one another "
         "name (--system LABEL=...) or choose another --output"),
        ([*POPE, "--files", f"random={empty}"],
         f"{empty}: empty POPE file; point to a file with at least one question"),
        ([*POPE, "--batch-size", "0"], "--batch-size 0 is out of range: give a whole number from 1 to 1024"),
        ([*POPE, "--system", "other=none", "--model", "builtin:nope"], "unknown builtin model 'nope': choose one of"),
        ([*POPE, "--system", "nope"], "unknown mitigation 'nope': choose one of"),
    ]


def test_failed_reruns_leave_a_finished_folder_intact(finished, tmp_path, capsys):
    before = _hashes(finished)
    assert {"job.json", "generations.jsonl", "results.json", "report.md", ".lock"} <= set(before)
    for argv, message in _folder_cases(tmp_path):
        rc, out, err = _cli(capsys, *argv, "--output", finished)
        assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, (argv, err)
        expected = message.format(out=finished)
        assert err == f"error: {expected}\n" or (expected.endswith("choose one of") and expected in err), (argv, err)
        assert _hashes(finished) == before, argv
    rc, out, _ = _cli(capsys, "report", finished)
    assert rc == 0 and "| none |" in out


def test_the_same_run_again_resumes_and_writes_no_new_record(finished, capsys):
    def job() -> dict:
        return {k: v for k, v in json.loads((finished / "job.json").read_text()).items() if k != "output"}

    cache, before = (finished / "generations.jsonl").read_bytes(), job()
    rc, _, _ = _cli(capsys, *POPE, "--system", "none", "--output", finished)
    assert rc == 0
    assert (finished / "generations.jsonl").read_bytes() == cache and job() == before


def test_a_folder_with_a_broken_job_json_is_refused(finished, capsys):
    (finished / "job.json").write_text("{not json")
    before = _hashes(finished)
    rc, _, err = _cli(capsys, *POPE, "--system", "none", "--output", finished)
    assert rc == 2 and err.startswith(f"error: output folder '{finished}' has a job.json that is not a valid job (")
    assert err.endswith("): choose another --output\n") and err.count("\n") == 1
    assert _hashes(finished) == before


# ------------------------------------------------------------------------------------------- output paths
def test_output_path_that_is_a_file(tmp_path, capsys):
    afile = tmp_path / "results.txt"
    afile.write_text("keep me")
    rc, out, err = _cli(capsys, *POPE, "--output", afile)
    assert (rc, out) == (2, "")
    assert err == f"error: --output '{afile}' is a file, not a folder: choose another --output (or remove the file)\n"
    rc, out, err = _cli(capsys, *POPE, "--output", afile / "sub")
    assert (rc, out) == (2, "")
    assert err == (f"error: --output '{afile / 'sub'}' cannot be created: '{afile}' is a file, not a folder: "
                   "choose another --output\n")
    assert afile.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def _read_only(folder: Path, how: str, monkeypatch) -> None:
    if how == "chmod":
        if os.geteuid() == 0:
            pytest.skip("root writes into a 0o555 folder; the 'access' and 'lock-file' cases simulate it")
        folder.chmod(0o555)
    elif how == "access":  # what access(2) answers for a folder the user cannot write
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == folder else real(p, mode, **kw))
    else:  # what open(2) answers when the lock file cannot be created
        real_open = os.open

        def deny(p, flags, *args, **kw):
            if Path(p) == folder / ".lock":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(p))
            return real_open(p, flags, *args, **kw)

        monkeypatch.setattr(os, "open", deny)


@pytest.mark.parametrize("how", ["chmod", "access", "lock-file"])
def test_read_only_output_folder(finished, tmp_path, capsys, monkeypatch, how):
    before = _hashes(finished)
    _read_only(finished, how, monkeypatch)
    try:
        rc, out, err = _cli(capsys, *POPE, "--system", "vcd", "--output", finished)
        assert (rc, out) == (2, "")
        assert err == (f"error: output folder '{finished}' is not writable (Permission denied): "
                       "choose another --output\n")
        rc, out, err = _cli(capsys, "report", finished)
        assert (rc, out) == (2, "")
        assert err == (f"error: output folder '{finished}' is not writable (Permission denied): make it writable, "
                       "or report a copy of the folder\n")
    finally:
        finished.chmod(0o755)
        monkeypatch.undo()
    assert _hashes(finished) == before
    assert _cli(capsys, "report", finished)[0] == 0


def test_unwritable_parent_leaves_nothing(tmp_path, capsys, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: make mkdir fail the way it would
        real = Path.mkdir

        def deny(self, *args, **kwargs):
            if self == parent / "out":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(Path, "mkdir", deny)
    else:
        parent.chmod(0o555)
    try:
        rc, _, err = _cli(capsys, *POPE, "--output", parent / "out")
    finally:
        parent.chmod(0o755)
    assert rc == 2
    assert err == (f"error: output folder '{parent / 'out'}' is not writable (Permission denied): "
                   "choose another --output\n")
    assert list(parent.iterdir()) == []


# ------------------------------------------------------------------------------------------- bad eval input
def _job_file(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(f'output = "{tmp_path / "out"}"\n' + text)
    return path


def test_bad_eval_inputs_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    decode0 = _job_file(tmp_path, "decode0.toml", '[[systems]]\nmodel = "builtin:tiny-llava"\n'
                                                  'decode = {max_new_tokens = 0}\n[[benchmarks]]\nkind = "pope"\n')
    huge = _job_file(tmp_path, "huge.toml", '[[systems]]\nmodel = "builtin:tiny-llava"\n'
                                            '[[benchmarks]]\nkind = "chair"\nmax_new_tokens = 1000000000\n')
    batch0 = _job_file(tmp_path, "batch0.toml", 'batch_size = 0\n[[systems]]\n[[benchmarks]]\nkind = "pope"\n')
    binary = _job_file(tmp_path, "job.toml", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe")
    cases = [
        (["eval", "chair", "--max-new-tokens", "1000000000"],
         "--max-new-tokens 1000000000 is out of range: give a whole number from 1 to 8192"),
        (["eval", "crosscheck", "--max-new-tokens", "0", "--system", "none", "--system", "var"],
         "--max-new-tokens 0 is out of range: give a whole number from 1 to 8192"),
        (["eval", "pope", "--files", "random"],
         "--files: 'random' is not SPLIT=PATH (e.g. random=coco_pope_random.json): name the split of each file"),
        (["eval", "pope", "--files", "random=a.json", "random=b.json"],
         "--files: split 'random' is given twice: give one file per split"),
        (["eval", "pope", "--batch-size", "0"], "--batch-size 0 is out of range: give a whole number from 1 to 1024"),
        (["eval", "pope", "--batch-size", "-4"], "--batch-size -4 is out of range: give a whole number from 1 to 1024"),
        (["eval", "chair", "--batch-size", "100000"],
         "--batch-size 100000 is out of range: give a whole number from 1 to 1024"),
        (["eval", "pope", "--limit", "0"], "--limit 0 is out of range: give a whole number of at least 1"),
        (["eval", "chair", "--n-images", "-1"], "--n-images -1 is out of range: give a whole number of at least 1"),
        (["eval", "pope", "--system", "=var"],
         "--system '=var': the label before '=' is empty: write LABEL=var or just var"),
        (["eval", "run", decode0],
         f"job file '{decode0}': systems.0.decode: max_new_tokens: Input should be greater than or equal to 1"),
        (["eval", "run", huge],
         f"job file '{huge}': benchmarks.0.chair.max_new_tokens: Input should be less than or equal to 8192"),
        (["eval", "run", batch0], f"job file '{batch0}': batch_size: Input should be greater than or equal to 1"),
        (["eval", "run", binary],
         f"job file '{binary}' is not a text file (byte 0x89 at offset 0 is not UTF-8): "
         "give a .toml, .yaml or .json job"),
    ]
    for argv, message in cases:
        if argv[1] != "run":
            argv = [*argv, "--output", out]
        rc, stdout, err = _cli(capsys, *argv)
        assert (rc, stdout, err) == (2, "", f"error: {message}\n"), argv
    rc, _, err = _cli(capsys, *POPE, "--system", "x=none", "--model", "builtin:nope", "--output", out)
    assert rc == 2 and err.startswith("error: unknown builtin model 'nope'") and err.count("\n") == 1
    assert not out.exists()  # the failed run made the folder for its lock and removed it again


# ------------------------------------------------------------------------------------------- consistency
def test_system_flag_forms():
    from clearsight.evals.cli import _systems
    from clearsight.evals.job import parse_job

    args = build_parser().parse_args(["eval", "pope", "--system", "var:p=0.4", "--system", "var:p=0.4+vhr",
                                      "--system", "mine=var:p=0.4", "--system", "none", "--system", "base=none",
                                      "--system", "var+vhr:alpha=2"])
    systems = _systems(args)
    assert [(s["name"], s["mitigations"]) for s in systems] == [
        ("var:p=0.4", ["var:p=0.4"]), ("var:p=0.4+vhr", ["var:p=0.4", "vhr"]), ("mine", ["var:p=0.4"]),
        ("none", []), ("base", []), ("var+vhr:alpha=2", ["var", "vhr:alpha=2"])]
    job = parse_job({"systems": systems, "benchmarks": [{"kind": "pope"}]})
    assert [m["p"] for m in job.systems[0].mitigation_config()] == [0.4]
    assert job.systems[1].mitigation_config()[0]["p"] == 0.4 and job.systems[1].mitigation_config()[1]["name"] == "vhr"


def test_one_default_model():
    from clearsight.evals.demo import DEMO_MODELS
    from clearsight.evals.job import SystemSpec

    assert SystemSpec().model == DEFAULT_MODEL == "builtin:shapes-llava"
    # the demo runs the model organism (issue 17) on its world, falling back to the default model
    assert DEMO_MODELS == ("builtin:shapes-organism", DEFAULT_MODEL)
    for command in ("pope", "chair", "crosscheck"):
        assert build_parser().parse_args(["eval", command]).model == DEFAULT_MODEL


def test_system_forms_run_and_the_batch_size_used_is_recorded(tmp_path, capsys):
    out = tmp_path / "out"
    rc, printed, err = _cli(capsys, *POPE, "--limit", "1", "--batch-size", "3", "--output", out,
                            "--system", "var:p=0.4", "--system", "var:p=0.4+vhr", "--system", "mine=var:p=0.4")
    assert rc == 0, err
    assert _reported_systems(out) == ["var:p=0.4", "var:p=0.4+vhr", "mine"]
    assert [s["decode"]["batch_size"] for s in json.loads((out / "results.json").read_text())["systems"]] == [3] * 3
    # the three share their decode settings: printed once (issue 16), with the batch size the run used
    assert printed.count('"batch_size": 3') == 1 and "All 3 systems: `" in printed and '"batch_size": 8' not in printed
    rc, printed, _ = _cli(capsys, "report", out)  # from job.json: still the batch size the run used
    assert rc == 0 and printed.count('"batch_size": 3') == 1 and "All 3 systems: `" in printed
