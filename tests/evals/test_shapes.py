"""Shapes world: determinism, partner co-occurrence, files readable by the POPE and CHAIR loaders."""

import hashlib
import json
import re

import pytest

from clearsight.evals import (
    EvalInputError,
    ShapesWorldSpec,
    compute_chair,
    generate_scenes,
    load_builtin_shapes,
    partner_rate,
    resolve_builtin,
    write_shapes_world,
)
from clearsight.evals.datasets.shapes import PARTNER_PAIRS, SHAPES, render_scene, shapes_chair_vocabulary

SMALL = ShapesWorldSpec(n_images=40, seed=7)


def tree_hashes(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path):
    a = write_shapes_world(SMALL, tmp_path / "a")
    b = write_shapes_world(SMALL, tmp_path / "b")
    ha, hb = tree_hashes(a.root), tree_hashes(b.root)
    assert ha == hb and len([k for k in ha if k.startswith("images/")]) == 40
    c = write_shapes_world(ShapesWorldSpec(n_images=40, seed=8), tmp_path / "c")
    assert tree_hashes(c.root) != ha


def test_scene_layout_and_caption():
    scenes = generate_scenes(SMALL)
    spec = SMALL
    for s in scenes:
        names = s.object_names
        assert spec.objects_per_scene[0] <= len(names) <= spec.objects_per_scene[1]
        assert len(set(names)) == len(names) and set(names) <= set(SHAPES)
        cells = [o.cell for o in s.objects]
        assert cells == sorted(cells) and len(set(cells)) == len(cells)  # reading order, one per cell
        for o in s.objects:
            x, y, w, h = o.bbox
            assert 18 <= w == h <= 22 and 0 <= x <= 96 - w and 0 <= y <= 96 - h
            # the box centre lies within 2 px jitter (+1 rounding) of its cell centre
            assert abs(x + w // 2 - (o.cell[1] * 24 + 12)) <= 3
            assert abs(y + h // 2 - (o.cell[0] * 24 + 12)) <= 3
        expected = ", ".join(f"a {o.colour} {o.shape}" for o in s.objects[:-1])
        last = f"a {s.objects[-1].colour} {s.objects[-1].shape}"
        assert s.caption == (f"{expected} and {last}." if expected else f"{last}.")
    img = render_scene(scenes[0], spec)
    assert img.size == (96, 96)
    o = scenes[0].objects[0]
    x, y, w, _ = o.bbox
    assert img.getpixel((x + w // 2, y + w // 2)) != spec.background or o.shape in ("ring", "frame")


def test_partner_rate_near_spec():
    scenes = generate_scenes(ShapesWorldSpec(n_images=2000, seed=0))
    assert partner_rate(scenes, PARTNER_PAIRS) == pytest.approx(0.85, abs=0.04)
    low = generate_scenes(ShapesWorldSpec(n_images=2000, seed=0, partner_probability=0.2))
    assert partner_rate(low, PARTNER_PAIRS) < 0.3


def test_noise_objects_training_only(tmp_path):
    spec = ShapesWorldSpec(n_images=200, seed=1, noise_fraction=0.1)
    objs = [o for s in generate_scenes(spec) for o in s.objects]
    assert 0.05 < sum(o.noise for o in objs) / len(objs) < 0.15
    with pytest.raises(EvalInputError, match="noise_fraction=0.1 but written worlds are evaluation data"):
        write_shapes_world(spec, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_files_load_with_pope_and_chair_loaders(tmp_path):
    w = write_shapes_world(SMALL, tmp_path / "w")
    scenes = {s.image_id: s for s in generate_scenes(SMALL)}
    sets = w.load_pope()  # also checks every image exists
    eligible = [s for s in scenes.values() if len(s.objects) >= 3]
    for ps in sets.values():
        assert ps.n == 6 * len(eligible)
        assert sum(q.label == "yes" for q in ps.questions) == ps.n // 2
    by_file = {s.file_name: s for s in scenes.values()}
    for q in sets["adversarial"].questions:
        obj = re.fullmatch(r"Is there an? (\w+) in the image\?", q.text).group(1)
        assert (obj in by_file[q.image].object_names) == (q.label == "yes")
    gt = w.ground_truth()
    assert gt == {i: set(s.object_names) for i, s in scenes.items()}
    vocab = w.chair_vocabulary()
    assert vocab == shapes_chair_vocabulary(SMALL)
    # the GT captions themselves are never hallucinated; synonyms and "plus sign" map to the shape
    res = compute_chair({i: s.caption for i, s in scenes.items()}, gt, vocab)
    assert res.chair_i == 0.0 and res.recall == 1.0
    assert vocab.objects("Two discs, a box and a plus sign.") == ["circle", "square", "cross"]
    inst = json.loads(w.instances.read_text())
    assert {c["name"] for c in inst["categories"]} == set(SHAPES)
    assert len(json.loads(w.captions.read_text())["annotations"]) == 3 * len(scenes)


def test_builtin_generated_once_and_reused(tmp_path):
    spec = ShapesWorldSpec(n_images=12, seed=3)
    a = load_builtin_shapes(tmp_path, spec)
    assert a.root.name == f"shapes-{spec.digest()}" and (a.root / "spec.json").is_file()
    marker = a.images_dir / spec.model_dump()["name"]
    marker.write_text("x")  # a regenerated folder would not contain this file
    b = load_builtin_shapes(tmp_path, spec)
    assert b.root == a.root and marker.exists()
    assert [p.name for p in tmp_path.iterdir()] == [a.root.name]  # no temp folders left behind
    with pytest.raises(EvalInputError, match="unknown built-in dataset 'builtin:coco'"):
        resolve_builtin("builtin:coco", tmp_path)


def test_spec_validation():
    with pytest.raises(ValueError, match="more than one partner pair"):
        ShapesWorldSpec(partner_pairs=(("circle", "star"), ("circle", "moon")))
    with pytest.raises(ValueError, match="objects_per_scene"):
        ShapesWorldSpec(objects_per_scene=(3, 20))


def test_adversarial_negatives_ask_for_absent_partners(tmp_path):
    # When a positive's partner is absent from the image, the co-occurrence ranking makes adversarial POPE
    # ask about exactly that partner (unless already asked): that is what makes it hard for a model with a
    # co-occurrence prior. Random POPE picks it only by chance (about 1 in 13).
    w = write_shapes_world(ShapesWorldSpec(n_images=150, seed=2), tmp_path / "w")
    partner = {a: b for a, b in PARTNER_PAIRS} | {b: a for a, b in PARTNER_PAIRS}
    scenes = generate_scenes(ShapesWorldSpec(n_images=150, seed=2))
    present = {s.file_name: set(s.object_names) for s in scenes}
    rate = {}
    for split, ps in w.load_pope().items():
        qs = ps.questions
        hits = total = 0
        for pos, neg in zip(qs[::2], qs[1::2]):
            p = re.fullmatch(r"Is there an? (\w+) in the image\?", pos.text).group(1)
            n = re.fullmatch(r"Is there an? (\w+) in the image\?", neg.text).group(1)
            if partner[p] not in present[pos.image]:
                total += 1
                hits += n == partner[p]
        rate[split] = hits / total
    assert rate["adversarial"] > 0.9
    assert rate["random"] < 0.25 and rate["popular"] < 0.5


def test_organism_world_small_faint_partners_and_long_captions():
    """Issue 17's world: each pair's second member drawn 8-11 px at opacity 0.45 (pixel colour = the blend),
    long captions name a present partner right after its trigger; the default world is unchanged."""
    from clearsight.evals.datasets.shapes import COLOURS, organism_spec

    assert ShapesWorldSpec().digest() == "9ba8e8a73e7d3d30"  # the organism fields left out at their defaults
    spec = organism_spec(n_images=60, seed=5)
    small = {b for _, b in PARTNER_PAIRS}
    scenes = generate_scenes(spec)
    for s in scenes:
        for o in s.objects:
            lo, hi = (8, 11) if o.shape in small else (18, 22)
            assert lo <= o.bbox[2] <= hi, o
    # a small square-ish shape (hourglass) blended at 0.45 over the background: its centre pixel, by hand
    sc = next(s for s in scenes if any(o.shape == "hourglass" for o in s.objects))
    o = next(o for o in sc.objects if o.shape == "hourglass")
    x, y, w, _ = o.bbox
    px = render_scene(sc, spec).getpixel((x + w // 2, y + 1))  # top bar of the hourglass
    a = int(255 * 0.45) / 255
    want = tuple(round(bg + a * (c - bg)) for bg, c in zip(spec.background, COLOURS[o.colour]))
    assert all(abs(p - q) <= 1 for p, q in zip(px, want)), (px, want)
    trig = {b: a for a, b in PARTNER_PAIRS}
    seen = 0
    for s in scenes:
        names = s.object_names
        words = s.caption.replace(",", " ").replace(".", " ").split()
        named = [w for w in words if w in SHAPES]
        assert sorted(named) == sorted(names)
        for o in s.objects:
            if o.shape in trig and trig[o.shape] in names:  # named right after its trigger
                i = named.index(o.shape)
                assert named[i - 1] == trig[o.shape] and f"with a small {o.colour} {o.shape} at the " in s.caption
                seen += 1
    assert seen > 20
    assert scenes[0].caption.startswith("a ") and " at the " in scenes[0].caption
