"""The Engine against independent oracles: every request gets exactly the tokens it gets alone.

Joining is made deterministic with ``submit(on_event=...)``: the callback runs on the engine thread, so
a request submitted from request A's k-th token event joins before A's next decode step (A has produced
exactly k tokens). Every wait has a timeout, so a bug fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import threading
import warnings

import pytest
import torch
from tinyworld import _CACHE, FAMILIES, make_image, tiny

from clearsight import DecodeSpec, generate
from clearsight.engine import Engine
from clearsight.errors import EngineBusy, EngineClosed, InputError, RequestCancelled
from clearsight.kernels.plan import StatsRequest

T = 120  # seconds: a bound on every wait, never a timing assertion
DECODE = DecodeSpec(max_new_tokens=8, ignore_eos=True)
A = {"prompt": "describe the image please, in every detail", "image": make_image(1, (64, 30))}
B = {"prompt": "what is this?", "image": make_image(2)}
VAR = "var:p=0.6,sink_dims=5|17,tau=6,rho=0,min_image_mass=0"


@pytest.fixture
def engine_of():
    made: list[Engine] = []

    def make(family: str, **kw) -> Engine:
        eng = Engine(tiny(family), **kw)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.close(timeout=T)
        assert not eng._thread.is_alive()


def solo(family, req, mits=(), decode=DECODE, stats=None):
    """The oracle: the request alone through generate() (run while the engine is idle)."""
    lvlm = _CACHE.get(family) or tiny(family)  # no set_backend while an engine owns the model
    return generate(lvlm, [req], list(mits), decode=decode, stats=stats)[0]


def joined(eng, a, b, k, mits_a=(), mits_b=(), decode=DECODE, stats=None):
    """Submit b when a has produced exactly k tokens; both results and the most requests seen in flight."""
    seen = {"n": 0, "max": 0}
    later = []

    def on_a(ev):
        seen["n"] += 1
        if seen["n"] == k:
            later.append(eng.submit(b, list(mits_b), decode, stats=stats, on_event=on_b))

    def on_b(ev):
        seen["max"] = max(seen["max"], eng._scheduler.snapshot()["requests"])

    ha = eng.submit(a, list(mits_a), decode, stats=stats, on_event=on_a)
    ra = ha.result(T)
    assert later, "b was never submitted"
    return ra, later[0].result(T), seen["max"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mits", [(), ("pai",), ("vcd",)], ids=["none", "pai", "vcd"])
@pytest.mark.parametrize("k", [1, 4])
def test_joined_request_gets_its_solo_tokens(engine_of, family, mits, k):
    eng = engine_of(family)
    ra, rb, most = joined(eng, A, B, k, mits, mits)
    assert most == 2  # b really ran inside a's batch
    assert ra.token_ids == solo(family, A, mits).token_ids
    assert rb.token_ids == solo(family, B, mits).token_ids


@pytest.mark.parametrize(("mits_a", "mits_b"), [
    ((VAR,), (VAR,)),  # plan edit written by a prefill hook
    (("m3id",), ("m3id",)),  # branch
    (("vhr:alpha=3",), ("vhr:alpha=3",)),  # measurement branch that leaves after the prefill
    (("vhr:alpha=3,text_pass=probe",), ()),  # probe before the prefill
    (("causalmm",), ("pai",)),  # counterfactual branch joined by a request with another plan edit
    ((), ("vcd", "pai")),  # mixed: unmitigated request, then a branch + plan edit
], ids=["var", "m3id", "vhr", "vhr-probe", "causalmm+pai", "none+vcd-pai"])
@pytest.mark.parametrize("k", [2, 5])
def test_every_mitigation_kind_joins_exactly(engine_of, mits_a, mits_b, k):
    eng = engine_of("tiny-llava")
    ra, rb, most = joined(eng, A, B, k, mits_a, mits_b)
    assert most == 2
    assert ra.token_ids == solo("tiny-llava", A, mits_a).token_ids
    assert rb.token_ids == solo("tiny-llava", B, mits_b).token_ids


def test_mitigations_are_not_vacuous_on_the_tiny_model():
    base = solo("tiny-llava", A).token_ids
    assert any(solo("tiny-llava", A, m).token_ids != base for m in [("pai",), ("vcd",), (VAR,)])


@pytest.mark.parametrize("family", ["tiny-llava", "tiny-qwen2-vl"])
def test_statistics_per_request_match_solo(engine_of, family):
    stats = StatsRequest(segment_mass=True, last_row=True, layers=frozenset({1}))
    eng = engine_of(family)
    ra, rb, most = joined(eng, A, B, 3, decode=DECODE, stats=stats)
    assert most == 2
    for req, got in ((A, ra), (B, rb)):
        alone = solo(family, req, stats=stats)
        assert got.token_ids == alone.token_ids
        lay = alone.stats["layout"]
        assert got.stats["layout"].image_spans == tuple((s - lay.pad, e - lay.pad) for s, e in lay.image_spans)
        torch.testing.assert_close(got.stats["segment_mass"][1], alone.stats["segment_mass"][1], atol=1e-5, rtol=0)
        assert len(got.stats["last_row"][1]) == len(alone.stats["last_row"][1])
        for x, y in zip(got.stats["last_row"][1], alone.stats["last_row"][1]):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_seeded_sampling_repeats_under_any_interleaving(engine_of):
    sample = DecodeSpec(max_new_tokens=8, do_sample=True, temperature=1.5, seed=3, ignore_eos=True)
    expect_a = solo("tiny-llava", A, decode=sample).token_ids
    expect_b = solo("tiny-llava", B, decode=sample).token_ids
    eng = engine_of("tiny-llava")
    for k in (1, 3, 6):
        ra, rb, _ = joined(eng, A, B, k, decode=sample)
        assert (ra.token_ids, rb.token_ids) == (expect_a, expect_b)


def test_eight_threads_each_get_their_solo_result(engine_of):
    reqs = [{"prompt": f"question number {i}: what is shown?", "image": make_image(10 + i, (32 + 4 * i, 40))}
            for i in range(8)]
    mits = [(), ("pai",), ("vcd",), (), ("m3id",), (), ("pai",), ()]
    decode = DecodeSpec(max_new_tokens=5, ignore_eos=True)
    expected = [solo("tiny-llava", r, m, decode).token_ids for r, m in zip(reqs, mits)]
    eng = engine_of("tiny-llava")
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(i):
        try:
            start.wait(T)
            got[i] = eng.submit(reqs[i], list(mits[i]), decode).result(T).token_ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T)
    assert not errors
    assert [got[i] for i in range(8)] == expected


def test_cancel_frees_the_rows_and_the_rest_finish(engine_of):
    eng = engine_of("tiny-llava")
    long = DecodeSpec(max_new_tokens=40, ignore_eos=True)
    rows_seen = []
    handles = {}

    def on_b(ev):  # on the engine thread: the scheduler's state between two steps
        rows_seen.append(eng._scheduler.snapshot()["rows"])
        if len(rows_seen) == 3:
            handles["a"].cancel()

    handles["a"] = eng.submit(A, ["vcd"], long)  # 2 rows
    handles["b"] = eng.submit(B, [], long, on_event=on_b)  # 1 row
    with pytest.raises(RequestCancelled):
        handles["a"].result(T)
    rb = handles["b"].result(T)
    assert rb.token_ids == solo("tiny-llava", B, decode=long).token_ids
    assert max(rows_seen) == 3  # a's two rows and b's
    assert set(rows_seen[4:-1]) == {1} and rows_seen[-1] == 0  # a's rows left at once; then b's own at its end


def test_a_bad_request_fails_alone(engine_of, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    eng = engine_of("tiny-llava")
    handles = {}

    def on_a(ev):
        if "bad" not in handles:
            handles["bad"] = eng.submit({"prompt": "what?", "image": str(bad)})
            handles["unknown"] = eng.submit(B, ["no-such-mitigation"])
            handles["b"] = eng.submit(B, [], DECODE)

    ra = eng.submit(A, [], DECODE, on_event=on_a).result(T)
    assert ra.token_ids == solo("tiny-llava", A).token_ids
    assert handles["b"].result(T).token_ids == solo("tiny-llava", B).token_ids
    for name in ("bad", "unknown"):
        with pytest.raises(InputError) as err:
            handles[name].result(T)
        assert "\n" not in str(err.value)
    # and the engine keeps serving
    assert eng.submit(B, [], DECODE).result(T).token_ids == solo("tiny-llava", B).token_ids


def test_full_queue_is_busy_at_once(engine_of):
    eng = engine_of("tiny-llava", max_queue=2, max_requests=1)
    release, entered = threading.Event(), threading.Event()

    def block(ev):
        entered.set()
        release.wait(T)  # holds the engine thread inside a's first event

    ha = eng.submit(A, [], DECODE, on_event=block)
    try:
        assert entered.wait(T)
        hb, hc = eng.submit(B), eng.submit(B)
        with pytest.raises(EngineBusy):
            eng.submit(B)
    finally:
        release.set()
    for h in (ha, hb, hc):
        h.result(T)


def test_close_with_work_in_flight_ends_every_handle(engine_of):
    eng = engine_of("tiny-llava", max_requests=1)
    release, entered = threading.Event(), threading.Event()

    def block(ev):
        entered.set()
        release.wait(T)

    long = DecodeSpec(max_new_tokens=50, ignore_eos=True)
    running = eng.submit(A, [], long, on_event=block)
    assert entered.wait(T)
    queued = [eng.submit(B, [], long) for _ in range(3)]
    closer = threading.Thread(target=eng.close, kwargs={"timeout": T})
    closer.start()
    release.set()
    closer.join(T)
    for h in [running, *queued]:
        with pytest.raises(EngineClosed):
            h.result(T)
    with pytest.raises(EngineClosed):
        eng.submit(B)


def test_asyncio_await_and_async_for(engine_of):
    eng = engine_of("tiny-llava")

    async def main():
        h1, h2 = eng.submit(A, [], DECODE), eng.submit(B, [], DECODE)
        events = [ev async for ev in h2]
        r1 = await asyncio.wait_for(h1, T)
        return r1, events

    r1, events = asyncio.run(main())
    assert r1.token_ids == solo("tiny-llava", A).token_ids
    assert events[-1].finished and [e.token_id for e in events] == solo("tiny-llava", B).token_ids


def test_generate_and_stream_on_the_engine(engine_of):
    eng = engine_of("tiny-llava")
    reqs = [A, B, {"prompt": "is there a red circle?", "image": make_image(5)}]
    expected = [r.token_ids for r in generate(tiny("tiny-llava"), reqs, decode=DECODE)]
    assert [r.token_ids for r in eng.generate(reqs, decode=DECODE, timeout=T)] == expected
    by_request: dict[int, list[int]] = {}
    for ev in eng.stream(reqs, decode=DECODE):
        by_request.setdefault(ev.request, []).append(ev.token_id)
    assert [by_request[i] for i in range(3)] == expected


def test_per_request_backend(engine_of):
    eng = engine_of("tiny-llava")
    ref = eng.submit(A, ["pai"], DECODE, backend="reference")
    tor = eng.submit(B, ["pai"], DECODE, backend="torch")
    assert ref.result(T).token_ids == solo("tiny-llava", A, ["pai"]).token_ids
    assert tor.result(T).token_ids == solo("tiny-llava", B, ["pai"]).token_ids
    with pytest.raises(InputError):
        eng.submit(B, backend="eager").result(T)


def test_submit_takes_the_same_arguments_as_generate():
    """A single mitigation string is one mitigation (not its letters) and a decode dict is validated."""
    lvlm = tiny("tiny-llava")
    with Engine(lvlm) as eng:
        alone = generate(lvlm, ["what is it?"], ["pai"], DecodeSpec(max_new_tokens=3))[0]
        got = eng.submit("what is it?", "pai", {"max_new_tokens": 3}).result(120)
        assert got.token_ids == alone.token_ids and got.mitigations == alone.mitigations
        with pytest.raises(InputError, match="max_new_tokens"):
            eng.submit("what is it?", decode={"max_new_tokens": 0}).result(120)


@pytest.mark.parametrize("flags", [["--json"], ["--stream"]])
def test_cli_generate_runs_through_an_engine_and_closes_it(monkeypatch, capsys, flags):
    import json

    from clearsight.cli import main

    engines = []
    real_init = Engine.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        engines.append(self)

    monkeypatch.setattr(Engine, "__init__", init)
    assert main(["generate", "--model", "builtin:tiny-llava", "--prompt", "hi", "--max-new-tokens", "3", *flags]) == 0
    assert len(engines) == 1 and not engines[0]._thread.is_alive()  # closed at the end
    out = capsys.readouterr().out
    if flags == ["--json"]:
        data = json.loads(out)
        assert data["backend"] == "torch" and len(data["token_ids"]) <= 3 and "batch_size" not in data["decode"]


def test_a_mitigation_warning_is_said_once_per_engine(engine_of):
    """CCA on an untrained model warns; an Engine says it once, not once per request, even with the
    warnings filters reset in between (each image check's catch_warnings did that, and a long eval printed
    the warning for every request)."""
    from clearsight.mitigations.cca import UntrainedCheckpointWarning

    eng = engine_of("tiny-llava")
    req = {"prompt": "what is it?", "image": make_image(0)}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # Python's own once-per-location filter off: only ours dedupes
        for _ in range(3):
            eng.submit(req, ["cca"], DECODE).result(60)
    untrained = [w for w in seen if issubclass(w.category, UntrainedCheckpointWarning)]
    assert len(untrained) == 1 and "cca:trained=true" in str(untrained[0].message)
    # a fresh generate() call is a fresh scheduler: it says it again
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        solo("tiny-llava", req, ["cca"])
    assert sum(issubclass(w.category, UntrainedCheckpointWarning) for w in seen) == 1
