"""Generation cache edge cases found by mutation testing (docs/testing.md): a clean reload drops nothing
and warns nothing, the dropped tail's preview, the record layout on disk, lookups by system."""

from __future__ import annotations

import json
import os
import warnings

import pytest

from clearsight.evals import EvalInputError, GenerationCache, cache_key

SYS = {"model": "demo", "decode": {"max_new_tokens": 4}}
OTHER = {"model": "demo", "decode": {"max_new_tokens": 5}}


def test_clean_reload_drops_nothing_and_warns_nothing(tmp_path):
    p = tmp_path / "gen.jsonl"
    c = GenerationCache(p)
    c.put(SYS, "a", "Yes.")
    c.put(OTHER, "a", "No.", n_tokens=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = GenerationCache(p)
    assert again.dropped_tail is None and len(again) == 2
    assert again.outputs(SYS) == {"a": "Yes."} and again.outputs(OTHER) == {"a": "No."}
    assert cache_key(SYS, "a") in again and cache_key(SYS, "b") not in again
    assert sorted(r["output"] for r in again) == ["No.", "Yes."]
    # one canonical JSON object per line: key, system, sample id, output, then the extra fields
    line = json.loads(p.read_text().splitlines()[1])
    assert line == {"key": cache_key(OTHER, "a"), "system": OTHER, "sample_id": "a", "output": "No.", "n_tokens": 2}
    assert again.get(OTHER, "a")["n_tokens"] == 2 and again.get(OTHER, "b") is None


def test_dropped_tail_preview_is_the_bad_lines_start(tmp_path):
    p = tmp_path / "gen.jsonl"
    GenerationCache(p).put(SYS, "a", "Yes.")
    p.write_bytes(p.read_bytes() + b'{"key": "abc", "output": "cut off here' + b"x" * 100)
    with pytest.warns(UserWarning, match="dropped truncated/invalid last line 2"):
        c = GenerationCache(p)
    assert c.dropped_tail.line_number == 2
    assert c.dropped_tail.preview == ('{"key": "abc", "output": "cut off here' + "x" * 100)[:80]
    assert c.put(SYS, "b", "No.") is True
    assert [json.loads(x)["sample_id"] for x in p.read_text().splitlines()] == ["a", "b"]
    assert p.read_bytes().endswith(b"\n")


def test_undecodable_tail_is_previewed_and_the_warning_says_what_happens(tmp_path):
    p = tmp_path / "gen.jsonl"
    GenerationCache(p).put(SYS, "a", "Yes.")
    p.write_bytes(p.read_bytes() + b'{"key": "\xff\xfe broken')  # killed mid-write, and not valid UTF-8
    with pytest.warns(UserWarning) as caught:
        c = GenerationCache(p)
    assert [str(w.message) for w in caught] == [
        f"{p}: dropped truncated/invalid last line 2; that sample will be generated again"]
    assert c.dropped_tail.preview == '{"key": "\ufffd\ufffd broken'


def test_records_without_a_key_are_not_records(tmp_path):
    p = tmp_path / "gen.jsonl"
    GenerationCache(p).put(SYS, "a", "Yes.")
    good = p.read_text()
    p.write_text(good + '{"output": "no key"}\n' + good.replace('"a"', '"b"'))
    with pytest.raises(EvalInputError, match="line 2 is not a valid cache record"):
        GenerationCache(p)
    p.write_text(good + "[1, 2]\n" + good.replace('"a"', '"b"'))  # JSON, but not an object
    with pytest.raises(EvalInputError, match="line 2 is not a valid cache record"):
        GenerationCache(p)
    p.write_text(good + '{"key": 7}')  # a last line whose key is not a string: dropped, redone
    with pytest.warns(UserWarning, match="dropped truncated/invalid last line 2"):
        assert len(GenerationCache(p)) == 1


def test_reload_then_append_keeps_every_line_valid(tmp_path):
    p = tmp_path / "gen.jsonl"
    c = GenerationCache(p)
    for i in range(3):
        c.put(SYS, i, f"out {i}")
    GenerationCache(p).put(SYS, 3, "out 3")  # reloaded from a clean file, then appended
    again = GenerationCache(p)
    assert len(again) == 4 and p.read_text().count("\n") == 4
    # a bad tail after several good lines: cut exactly there, then appended
    p.write_bytes(p.read_bytes() + b'{"key": "half')
    with pytest.warns(UserWarning):
        c = GenerationCache(p)
    c.put(SYS, 4, "out 4")
    assert [json.loads(x)["sample_id"] for x in p.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert len(GenerationCache(p)) == 5


def test_put_makes_folders_a_readable_file_and_is_visible_at_once(tmp_path):
    p = tmp_path / "a" / "b" / "gen.jsonl"  # folders made as needed
    c = GenerationCache(p)
    assert c.put(SYS, "a", "Yes.", n_tokens=1) is True
    assert c.get(SYS, "a")["output"] == "Yes." and c.has(SYS, "a") and len(c) == 1  # this instance sees it
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o644 & ~umask  # rw-r--r--: never executable, readable by the reporter
    p.write_bytes(p.read_bytes() + b'{"key"')
    with pytest.warns(UserWarning):
        c = GenerationCache(p)
    c.put(SYS, "b", "No.")
    assert c.dropped_tail is None  # the bad tail is gone once the file is cut and appended


def test_duplicate_key_message_names_the_line_and_key(tmp_path):
    p = tmp_path / "gen.jsonl"
    GenerationCache(p).put(SYS, "a", "Yes.")
    p.write_text(p.read_text() * 2)
    with pytest.raises(EvalInputError) as err:
        GenerationCache(p)
    assert str(err.value) == f"{p}: line 2 duplicates key {cache_key(SYS, 'a')[:12]}...; delete the duplicate line"
