"""benchmarks/engine_load.py: its workloads (seeded, the stated length mixes) and its one-line input errors."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def engine_load():
    sys.path.insert(0, str(BENCH))
    try:
        import engine_load
        yield engine_load
    finally:
        sys.path.remove(str(BENCH))


def test_pope_chair_lengths_are_the_stated_mix(engine_load):
    rng = random.Random(0)
    lengths = [engine_load.answer_length(rng, "pope-chair", 24) for _ in range(6000)]
    short = [n for n in lengths if n <= 4]
    assert set(short) == {1, 2, 3, 4}
    assert {n for n in lengths if n > 4} == set(range(48, 65))  # nothing between the two kinds
    assert abs(len(short) / len(lengths) - 2 / 3) < 0.03  # 2/3 yes/no answers, 1/3 captions


def test_workloads_are_seeded_and_varied_stays_in_range(engine_load):
    def lengths(kind: str, seed: int) -> list[int]:
        return [d.max_new_tokens for *_, d in engine_load.workload(40, 2.0, seed, 8, 24, kind)]

    assert lengths("pope-chair", 3) == lengths("pope-chair", 3) != lengths("pope-chair", 4)
    assert all(6 <= n <= 42 for n in lengths("varied", 0))
    assert set(lengths("fixed", 0)) == {24}
    arrivals = [t for t, *_ in engine_load.workload(40, 2.0, 0, 8, 24, "varied")]
    assert arrivals == sorted(arrivals) and arrivals[0] > 0


@pytest.mark.parametrize("args, field", [(["--lengths", "bogus"], "--lengths"), (["--batch", "8,x"], "--batch"),
                                         (["--engine-rows", "0"], "--engine-rows"), (["--models", "gpt"], "--models")])
def test_bad_options_fail_with_one_line(engine_load, monkeypatch, capsys, args, field):
    monkeypatch.setattr(sys, "argv", ["engine_load.py", *args])
    with pytest.raises(SystemExit) as exc:
        engine_load.main()  # checked before any model loads
    assert exc.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}")
