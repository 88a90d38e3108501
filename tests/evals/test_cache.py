"""Generation cache: stable keys, no duplicates, truncated last line tolerated, mid-file corruption fatal."""

import hashlib
import json

import pytest

from clearsight.evals import EvalInputError, GenerationCache, cache_key

SYS = {"model": "demo", "mitigations": ["none"], "decode": {"greedy": True, "max_new_tokens": 16}}


def test_key_is_stable_and_order_independent():
    reordered = {"decode": {"max_new_tokens": 16, "greedy": True}, "mitigations": ["none"], "model": "demo"}
    assert cache_key(SYS, 1) == cache_key(reordered, 1)
    assert cache_key(SYS, 1) != cache_key(SYS, 2) != cache_key(SYS, "2")
    # sha256 of canonical JSON: a fixed value, so keys survive across processes and versions
    expected = hashlib.sha256(b'{"sample_id":"x","system":{"a":1}}').hexdigest()
    assert cache_key({"a": 1}, "x") == expected


def test_put_get_no_duplicates(tmp_path):
    p = tmp_path / "gen.jsonl"
    c = GenerationCache(p)
    assert c.put(SYS, 1, "Yes.") is True
    assert c.put(SYS, 1, "No.") is False  # already cached: not written again
    assert c.put(SYS, 2, "No.", latency_s=0.1) is True
    lines = p.read_text().splitlines()
    assert len(lines) == 2
    c2 = GenerationCache(p)  # reload from disk
    assert len(c2) == 2 and c2.get(SYS, 1)["output"] == "Yes." and c2.get(SYS, 2)["latency_s"] == 0.1
    assert c2.put(SYS, 2, "again") is False
    assert c2.outputs(SYS) == {1: "Yes.", 2: "No."}
    assert c2.outputs({"model": "other"}) == {}
    assert len(p.read_text().splitlines()) == 2


def test_truncated_last_line_is_dropped_and_redone(tmp_path):
    p = tmp_path / "gen.jsonl"
    c = GenerationCache(p)
    c.put(SYS, 1, "Yes.")
    c.put(SYS, 2, "No.")
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 9])  # killed while writing record 2
    with pytest.warns(UserWarning, match="dropped truncated/invalid last line 2"):
        c2 = GenerationCache(p)
    assert c2.dropped_tail is not None and c2.dropped_tail.line_number == 2
    assert c2.has(SYS, 1) and not c2.has(SYS, 2)
    assert c2.put(SYS, 2, "No.") is True  # redone
    rows = [json.loads(line) for line in p.read_text().splitlines()]  # every line valid again
    assert [r["sample_id"] for r in rows] == [1, 2]
    assert len(GenerationCache(p)) == 2


def test_last_line_without_newline_is_kept(tmp_path):
    p = tmp_path / "gen.jsonl"
    c = GenerationCache(p)
    c.put(SYS, 1, "Yes.")
    p.write_bytes(p.read_bytes().rstrip(b"\n"))
    c2 = GenerationCache(p)
    assert c2.dropped_tail is None and c2.has(SYS, 1)
    c2.put(SYS, 2, "No.")
    assert [json.loads(x)["sample_id"] for x in p.read_text().splitlines()] == [1, 2]


def test_mid_file_corruption_names_line(tmp_path):
    p = tmp_path / "gen.jsonl"
    c = GenerationCache(p)
    for i in range(3):
        c.put(SYS, i, f"out {i}")
    lines = p.read_text().splitlines()
    lines[1] = lines[1][:20]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(EvalInputError, match=r"gen\.jsonl: line 2 is not a valid cache record"):
        GenerationCache(p)


def test_duplicate_key_in_file_is_an_error(tmp_path):
    p = tmp_path / "gen.jsonl"
    GenerationCache(p).put(SYS, 1, "Yes.")
    line = p.read_text()
    p.write_text(line + line)
    with pytest.raises(EvalInputError, match="line 2 duplicates key"):
        GenerationCache(p)


def test_nan_config_rejected(tmp_path):
    with pytest.raises(EvalInputError, match="canonical-JSON"):
        GenerationCache(tmp_path / "g.jsonl").put({"temperature": float("nan")}, 1, "x")
