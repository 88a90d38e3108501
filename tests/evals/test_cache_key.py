"""The generation cache key changes with every field that changes an output, and with no other (issue 22).

A key that misses an output-changing field makes a rerun silently reuse stale generations (``vcd:alpha=1``
and ``vcd:alpha=3`` sharing a key); a key that includes a field that changes nothing (batch size, progress,
output folder) makes a resume regenerate everything. Alternative values are found from each pydantic
schema, so a new mitigation parameter or decode field is covered without editing this file, and a field
for which no other valid value is found fails the test (add a candidate below).
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Literal, get_args, get_origin

import pytest
from plant import plant
from tinyworld import make_image, tiny

from clearsight import generate
from clearsight.config import DecodeSpec, DType
from clearsight.errors import InputError
from clearsight.evals.cache import cache_key
from clearsight.evals.job import SystemSpec, parse_job
from clearsight.evals.runner import model_identity, run_job, system_config
from clearsight.mitigations.registry import REGISTRY

TINY = "builtin:tiny-llava"
SAMPLE = "pope/random/1/0123abcd"
CANDIDATES: list[Any] = [0.5, 0.25, 0.75, 1, 2, 3, [1], [0, 1], ("x",), "x", "attention", "clip"]


def key(**system: Any) -> str:
    return cache_key(system_config(SystemSpec(**{"model": TINY, **system}), 16), SAMPLE)


def alternative(cls: Any, field: str, base: dict[str, Any]) -> Any:
    """A valid value of ``cls.field`` whose canonical form differs from the default's, or None."""
    default = cls.model_validate(base).model_dump(mode="json")[field]
    ann = cls.model_fields[field].annotation
    options: list[Any] = list(get_args(ann)) if get_origin(ann) is Literal else []
    if isinstance(default, bool):
        options.append(not default)
    elif isinstance(default, int | float):
        options += [default * 2 + 1, default / 2, default + 1, default - 1]
    for value in options + CANDIDATES:
        try:
            dumped = cls.model_validate({**base, field: value}).model_dump(mode="json")
        except Exception:  # noqa: BLE001 - not a valid value of this field: try the next
            continue
        if dumped[field] != default:
            return value
    return None


def mitigation_variants() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, cls in sorted(REGISTRY.items()):
        out.append((name, {"name": name}))
        for field in cls.model_fields:
            if field == "name":
                continue
            value = alternative(cls, field, {"name": name})
            assert value is not None, f"no alternative value for {name}.{field}: add a candidate to CANDIDATES"
            out.append((f"{name}.{field}={value!r}", {"name": name, field: value}))
    return out


def check_every_mitigation_parameter_changes_the_key() -> None:
    variants = mitigation_variants()
    keys = {label: key(mitigations=[spec]) for label, spec in variants}
    for label, k in keys.items():
        same = [other for other, ko in keys.items() if ko == k and other != label]
        assert not same, f"{label} shares its cache key with {same}"
    # the order of a composition is an output-changing field too (each combiner gets the previous output)
    assert key(mitigations=["vcd", "m3id"]) != key(mitigations=["m3id", "vcd"])
    assert key(mitigations=[]) != key(mitigations=["vcd"])


def test_every_mitigation_parameter_changes_the_key():
    check_every_mitigation_parameter_changes_the_key()


def test_explicit_defaults_share_the_key():
    assert key(mitigations=["vcd"]) == key(mitigations=["vcd:alpha=1.0,beta=0.1"]) == \
        key(mitigations=[{"name": "vcd", "alpha": 1}])


def test_every_decode_field_and_the_dtype_change_the_key():
    base = key()
    keys = {"base": base}
    for field in DecodeSpec.model_fields:
        value = alternative(DecodeSpec, field, {})
        assert value is not None, f"no alternative value for decode.{field}"
        keys[field] = key(decode={field: value})
    for dtype in get_args(DType):
        keys[f"dtype={dtype}"] = key(dtype=dtype)
    keys["max_new_tokens=17"] = cache_key(system_config(SystemSpec(model=TINY), 17), SAMPLE)
    keys["sample"] = cache_key(system_config(SystemSpec(model=TINY), 16), SAMPLE + "x")
    assert len(set(keys.values())) == len(keys) - 1  # dtype=auto is the base system
    assert keys["dtype=auto"] == base


def test_backend_changes_the_key_only_where_it_changes_the_logits():
    """Plan-running backends agree to float rounding (tests/kernels, tests/test_generate.py); transformers'
    stock attention runs no plan (an attention-editing mitigation is refused there) and rounds differently."""
    assert key() == key(backend="torch") == key(backend="reference") == key(backend="triton") \
        == key(device="cuda:0") == key(device="cpu")
    assert len({key(), key(backend="sdpa"), key(backend="eager")}) == 3
    lvlm = tiny("tiny-llava")
    request = [{"prompt": "what is in the picture?", "image": make_image(0)}]
    lvlm.set_backend("sdpa")
    try:  # an attention edit on stock attention is refused, never silently a no-op
        with pytest.raises(InputError, match="backend 'sdpa'.*pai"):
            generate(lvlm, request, ["pai:alpha=3"], {"max_new_tokens": 8})
        assert generate(lvlm, request, [], {"max_new_tokens": 8})[0].token_ids  # no edits: runs
    finally:
        lvlm.set_backend("torch")


def test_weights_change_the_key(tmp_path):
    """Same sizes, other bytes (a fine-tuned checkpoint of the same architecture): another identity."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    before = key(model=str(folder))
    assert before == key(model=str(folder))
    (folder / "model.safetensors").write_bytes(b"\x01" * 64)
    os.utime(folder / "model.safetensors", ns=(1, 10**18))  # a new modification time, whatever the clock
    assert key(model=str(folder)) != before
    (folder / "config.json").write_text('{"a": 1}')
    assert len({before, key(model=str(folder)), key(model=TINY)}) == 3
    # a Hugging Face snapshot: files link to blobs named by their sha256, which is taken as the digest
    snap, blobs = tmp_path / "snap", tmp_path / "blobs"
    snap.mkdir()
    blobs.mkdir()
    (snap / "config.json").write_text("{}")
    for name in ("a" * 64, "b" * 64):
        (blobs / name).write_bytes(b"\x00" * 64)
    (snap / "model.safetensors").symlink_to(blobs / ("a" * 64))
    first = model_identity(SystemSpec(model=str(snap)))
    (snap / "model.safetensors").unlink()
    (snap / "model.safetensors").symlink_to(blobs / ("b" * 64))
    assert model_identity(SystemSpec(model=str(snap))) != first


@pytest.mark.usefixtures("shapes_cache")
def test_batch_size_progress_and_output_folder_keep_the_key(tmp_path, monkeypatch):
    """A finished run's cache, copied into another folder and run with another batch size and a progress
    bar, is reused whole: no model is loaded."""
    bench = [{"kind": "pope", "limit": 2, "splits": ["random"]}]
    systems = [{"name": "v", "model": TINY, "mitigations": ["vcd:alpha=2"], "decode": {"max_new_tokens": 4}}]
    run_job(parse_job({"systems": systems, "benchmarks": bench, "output": str(tmp_path / "a"), "batch_size": 1}),
            progress=None)
    (tmp_path / "b").mkdir()
    shutil.copy(tmp_path / "a" / "generations.jsonl", tmp_path / "b" / "generations.jsonl")

    def no_model(*a, **k):
        raise AssertionError("a model was loaded: the cache was not reused")

    monkeypatch.setattr("clearsight.models.loader.load_model", no_model)
    bars = []

    def progress(total, desc):
        from tqdm import tqdm

        bars.append(total)
        return tqdm(total=total, desc=desc, disable=True)

    job = parse_job({"systems": systems, "benchmarks": bench, "output": str(tmp_path / "b"), "batch_size": 7})
    results = run_job(job, progress=progress)
    assert results.systems[0].pope.splits["random"].n == 2
    # and the same job with another vcd alpha is not served from that cache
    other = [{**systems[0], "name": "v3", "mitigations": ["vcd:alpha=3"]}]
    with pytest.raises(AssertionError, match="a model was loaded"):
        run_job(parse_job({"systems": other, "benchmarks": bench, "output": str(tmp_path / "b"), "batch_size": 7}),
                progress=None)


# --------------------------------------------------------------------------------------- tests of the tests
def _names_without_parameters(mp):
    plant(mp, SystemSpec, "mitigation_config", 'm.model_dump(mode="json")', "m.name")


def _no_seed_in_decode(mp):
    plant(mp, SystemSpec, "decode_for", "return DecodeSpec(**data)",
          "return DecodeSpec(**{k: v for k, v in data.items() if k != 'seed'})")


@pytest.mark.parametrize("bug", [_names_without_parameters])
def test_planted_bug_fails_the_key_check(bug, monkeypatch):
    bug(monkeypatch)
    with pytest.raises(AssertionError):
        check_every_mitigation_parameter_changes_the_key()


def test_planted_decode_bug_fails_the_key_check(monkeypatch):
    _no_seed_in_decode(monkeypatch)
    with pytest.raises(AssertionError):
        test_every_decode_field_and_the_dtype_change_the_key()


# --------------------------------------------------------------------------------------- image and hub model
def test_image_content_changes_the_key_and_is_read_once(tmp_path, monkeypatch):
    """An image file replaced by other bytes under the same path (same size too) is another input; each file
    is read once however many items ask about it (POPE asks six questions per image per split)."""
    from clearsight.evals import runner
    from clearsight.evals.executor import WorkItem

    image = tmp_path / "a.jpg"
    image.write_bytes(b"\x00" * 32)
    reads = []
    monkeypatch.setattr(runner, "_file_digest", lambda p: reads.append(p) or __import__("hashlib").sha256(
        p.read_bytes()).hexdigest())
    runner._image_digest.cache_clear()
    items = [WorkItem(f"b/{i}/tag", f"question {i}", str(image), 8) for i in range(12)]
    first = [runner.item_inputs(it) for it in items]
    assert len(reads) == 1 and all(f == first[0] for f in first)
    assert first[0] == {"image": __import__("hashlib").sha256(b"\x00" * 32).hexdigest()}
    config = system_config(SystemSpec(model=TINY), 8)
    before = cache_key(config, items[0].sample_id, first[0])
    image.write_bytes(b"\x01" * 32)
    os.utime(image, ns=(1, 10**18))  # a new modification time, whatever the clock
    after = runner.item_inputs(items[0])
    assert after != first[0] and cache_key(config, items[0].sample_id, after) != before
    # no image, or an absent file (outputs imported without the images): the key of the id alone
    assert runner.item_inputs(WorkItem("j/1", "judge", None, 8)) is None
    assert runner.item_inputs(WorkItem("b/1", "q", str(tmp_path / "gone.jpg"), 8)) is None
    assert cache_key(config, "b/1", None) == cache_key(config, "b/1")


def test_replaced_image_is_generated_anew(tmp_path, monkeypatch):
    """Through the runner: imported outputs are reused while the images are unchanged (no model is loaded);
    after one image file is replaced under the same path, its samples are not served from the cache."""
    from clearsight.evals.runner import score_outputs

    root = tmp_path / "MME"
    (root / "existence").mkdir(parents=True)
    for stem in ("a", "b"):
        (root / "existence" / f"{stem}.jpg").write_bytes(stem.encode() * 8)
        (root / "existence" / f"{stem}.txt").write_text(
            "Is there a dog in this image? Please answer yes or no.\tYes\n"
            "Is there a cat in this image? Please answer yes or no.\tNo\n")

    def no_model(*a, **k):
        raise AssertionError("a model was loaded: the cache was not reused")

    monkeypatch.setattr("clearsight.models.loader.load_model", no_model)
    job = parse_job({"systems": [{"name": "theirs", "model": "external:theirs"}],
                     "benchmarks": [{"kind": "mme", "data": None, "root": str(root), "subsets": ["existence"]}],
                     "output": str(tmp_path / "out"), "stats": {"resamples": 100}})
    ids = ["existence/a/0", "existence/a/1", "existence/b/0", "existence/b/1"]
    score_outputs(job, {"theirs": dict(zip(ids, ["Yes", "No", "Yes", "No"]))})
    run_job(job, progress=None)  # every output cached: nothing to generate
    (root / "existence" / "b.jpg").write_bytes(b"c" * 8)  # same size, other bytes
    os.utime(root / "existence" / "b.jpg", ns=(1, 10**18))
    with pytest.raises(AssertionError, match="a model was loaded"):
        run_job(job, progress=None)


def fake_hub_snapshot(hub, repo: str, commit: str, weights: bytes) -> None:
    """The Hugging Face cache layout: refs/main names the commit, snapshot files link to blobs named by
    their sha256 (what ``hf download`` leaves; nothing is downloaded here)."""
    import hashlib

    folder = hub / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "blobs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(commit)
    snap = folder / "snapshots" / commit
    snap.mkdir(parents=True)
    for name, data in (("config.json", b"{}"), ("model.safetensors", weights)):
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snap / name).symlink_to(os.path.relpath(blob, snap))


def test_hub_id_is_keyed_by_its_cached_snapshot(tmp_path, monkeypatch):
    """A hub id in the local cache is keyed by its current snapshot's weights, not its name: a new revision
    with other weights (refs/main moved) is another model; a new commit with the same files keeps the key."""
    import huggingface_hub.constants

    hub = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    assert model_identity(SystemSpec(model="org/tiny")) == "org/tiny"  # not cached: cannot be loaded here
    fake_hub_snapshot(hub, "org/tiny", "1" * 40, b"\x00" * 64)
    first = key(model="org/tiny")
    assert model_identity(SystemSpec(model="org/tiny")).startswith("org/tiny#")
    assert first != key(model="org/other") and first == key(model="org/tiny")
    fake_hub_snapshot(hub, "org/tiny", "2" * 40, b"\x01" * 64)
    second = key(model="org/tiny")
    assert second != first
    fake_hub_snapshot(hub, "org/tiny", "3" * 40, b"\x01" * 64)  # e.g. a README edit: same weights and config
    assert key(model="org/tiny") == second
