"""The local executor runs through an Engine; batch_size is an engine limit, not a decoding option."""

from __future__ import annotations

import threading

import pytest

from clearsight import DecodeSpec, generate
from clearsight.errors import InputError
from clearsight.evals.executor import LocalExecutor, WorkItem
from clearsight.evals.job import SystemSpec, parse_job
from tests.tinyworld import make_image

TINY = "builtin:tiny-llava"


def _items(tmp_path, n: int, max_new_tokens: int = 4) -> list[WorkItem]:
    items = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        make_image(i).save(path)
        items.append(WorkItem(sample_id=f"s{i}", prompt=f"what is in the image? ({i})", image=str(path),
                              max_new_tokens=max_new_tokens))
    return items


def test_a_system_runs_through_one_engine_continuously_batched(tmp_path, monkeypatch):
    from clearsight.decoding.batch import Batch
    from clearsight.decoding.scheduler import Scheduler
    from clearsight.engine import Engine

    # the second request is submitted only once the first is prefilled and running, so it must JOIN it
    first_step = threading.Event()
    submits, joins, together = [], [], []
    real_submit, real_step, real_join, real_decode = Engine.submit, Scheduler.step, Batch.join, Batch.decode

    def submit(self, *a, **k):
        if len(submits) == 1:
            assert first_step.wait(120), "the engine never stepped"
        submits.append(k.get("index"))
        return real_submit(self, *a, **k)

    def step(self):
        real_step(self)
        first_step.set()

    def join(self, other):
        joins.append((len(self.entries), len(other.entries)))
        return real_join(self, other)

    def decode(self):
        together.append(len(self.entries))
        return real_decode(self)

    monkeypatch.setattr(Engine, "submit", submit)
    monkeypatch.setattr(Scheduler, "step", step)
    monkeypatch.setattr(Batch, "join", join)
    monkeypatch.setattr(Batch, "decode", decode)

    items = _items(tmp_path, 5)
    decode_spec = DecodeSpec(max_new_tokens=4, ignore_eos=True)  # every request runs 4 tokens: nobody leaves early
    got: dict[str, dict] = {}
    threads = set()

    def on_result(item, record):
        threads.add(threading.current_thread())
        got[item.sample_id] = record

    executor = LocalExecutor(batch_size=2)
    try:
        executor.generate(SystemSpec(model=TINY), decode_spec, items, on_result)
        assert len(executor._engines) == 1
        engine = next(iter(executor._engines.values()))
    finally:
        executor.close()
    assert not engine._thread.is_alive()  # close() ends the engine thread
    assert sorted(submits) == list(range(5))
    assert set(got) == {it.sample_id for it in items} and all(r["n_tokens"] == 4 for r in got.values())
    assert threads == {threading.current_thread()}  # results reach the caller on its own thread (the cache writer)
    assert joins, "no request joined a running batch"
    assert max(together) == 2  # requests of the system in flight together, never past the job's batch size

    # the engine's greedy tokens are generate()'s, request by request (the model has its backend back)
    solo = generate(engine.lvlm, [{"prompt": it.prompt, "image": it.image} for it in items],
                    decode=decode_spec, max_batch=1)
    assert [got[it.sample_id]["output"] for it in items] == [r.text for r in solo]


def test_systems_sharing_a_model_each_get_their_own_backend(tmp_path, monkeypatch):
    import clearsight.decoding.batch as batch_mod
    from clearsight.kernels.registry import default_backend

    used = []
    real_use_backend = batch_mod.use_backend

    def use_backend(name):
        used.append(name)
        return real_use_backend(name)

    monkeypatch.setattr(batch_mod, "use_backend", use_backend)
    items = _items(tmp_path, 2, max_new_tokens=3)
    records: dict[str, list[dict]] = {"ref": [], "plain": []}
    executor = LocalExecutor(batch_size=4)
    try:
        for label, system in (("ref", SystemSpec(model=TINY, backend="reference")), ("plain", SystemSpec(model=TINY))):
            used.clear()
            executor.generate(system, DecodeSpec(max_new_tokens=3), items,
                              lambda item, record, label=label: records[label].append(record))
            expected = "reference" if label == "ref" else default_backend("cpu")
            assert set(used) == {expected}  # every forward of the system ran its backend
            assert {r["backend"] for r in records[label]} == {expected}
        assert len(executor._engines) == 1  # one model, one engine, shared
    finally:
        executor.close()
    assert default_backend("cpu") != "reference"  # the second system did not inherit the first one's backend
    # the same greedy tokens on either backend
    assert [r["output"] for r in records["ref"]] == [r["output"] for r in records["plain"]]


def test_batch_size_is_not_a_decoding_option():
    with pytest.raises(ValueError, match="batch_size is not a decoding option"):
        DecodeSpec(batch_size=4)
    assert "batch_size" not in DecodeSpec.model_fields
    with pytest.raises(InputError, match="systems.0.decode: batch_size is not a decoding option: set the job's "
                                         "batch_size"):
        parse_job({"systems": [{"model": TINY, "decode": {"batch_size": 2}}], "benchmarks": [{"kind": "pope"}]})
    job = parse_job({"systems": [{"model": TINY}], "benchmarks": [{"kind": "pope"}], "batch_size": 2})
    assert job.batch_size == 2


@pytest.mark.parametrize("bad", [0, -1, 1025, 2.0, True, "8"])
def test_generate_max_batch_is_checked(bad):
    from clearsight.decoding.generate import check_max_batch

    with pytest.raises(InputError, match="max_batch must be an integer from 1 to 1024"):
        check_max_batch(bad)


def test_eval_cache_keys_did_not_change():
    """Generations cached before batch_size left DecodeSpec keep their keys (it was never part of them)."""
    from clearsight.evals._io import canonical_json
    from clearsight.evals.cache import cache_key
    from clearsight.evals.runner import system_config

    system = SystemSpec(model="org/some-vlm", mitigations=["var:p=0.4"],
                        decode={"do_sample": True, "seed": 3, "temperature": 1.2})
    config = system_config(system, 16)
    assert canonical_json(config["decode"]) == ('{"do_sample":true,"ignore_eos":false,"max_new_tokens":16,"seed":3,'
                                                '"stop":[],"temperature":1.2,"top_p":1.0}')
    assert cache_key(config, "pope/random/1") == "99a55fd2ee74021229b248d181cbbaed00eeea1a1381be1966b877e8fd82a65a"
    plain = system_config(SystemSpec(model="org/some-vlm"), 16)
    assert cache_key(plain, "pope/random/1") == "166a5b6b2c1c61124e932afedc2e35e730fa7f49e040e6143e7eb419e0cb5446"
