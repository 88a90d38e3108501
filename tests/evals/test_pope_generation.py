"""POPE question generation vs the official recipe (reference/evals.md 1.2), expected negatives by hand."""

import re

import pytest

from clearsight.evals import EvalInputError, PopeGenerationConfig, generate_pope_questions, write_pope_files
from clearsight.evals.datasets.pope import load_pope_file, question_text

# Frequencies over the 7 eligible images: cat 6, dog 5, car 4, bus 3, bird 2, tree 1 (no ties).
# "zebra" occurs only in an image with 2 objects, which is not eligible (< 3 objects), so it must
# never be asked about, and it must not change the frequencies.
GT = [
    {"image": "i1.jpg", "objects": ["cat", "dog", "car"]},
    {"image": "i2.jpg", "objects": ["cat", "dog", "car"]},
    {"image": "i3.jpg", "objects": ["cat", "dog", "bus"]},
    {"image": "i4.jpg", "objects": ["cat", "dog", "bird"]},
    {"image": "i5.jpg", "objects": ["cat", "car", "bus"]},
    {"image": "i6.jpg", "objects": ["cat", "dog", "tree"]},
    {"image": "i7.jpg", "objects": ["car", "bus", "bird"]},
    {"image": "i8.jpg", "objects": ["zebra", "bird"]},
]
CFG = PopeGenerationConfig(img_num=None, seed=3)
Q = re.compile(r"^Is there an? (.+) in the image\?$")


def by_image(questions):
    out = {}
    for q in questions:
        obj = Q.match(q.text).group(1)
        out.setdefault(q.image, []).append((obj, q.label))
    return out


def negatives(questions):
    return {img: [o for o, lab in qs if lab == "no"] for img, qs in by_image(questions).items()}


@pytest.mark.parametrize("split", ["random", "popular", "adversarial"])
def test_counts_balance_order(split):
    qs = generate_pope_questions(GT, split, CFG)
    assert len(qs) == 7 * 6
    assert [q.question_id for q in qs] == list(range(1, 43))
    assert [q.label for q in qs] == ["yes", "no"] * 21  # each positive followed by one negative
    per = by_image(qs)
    assert set(per) == {f"i{i}.jpg" for i in range(1, 8)}  # i8 (2 objects) is not eligible
    gt = {g["image"]: g["objects"] for g in GT}
    for img, items in per.items():
        # positives: the first three listed objects, in order
        assert [o for o, lab in items if lab == "yes"] == gt[img][:3]
        negs = [o for o, lab in items if lab == "no"]
        assert len(set(negs)) == 3 and not set(negs) & set(gt[img])
        assert "zebra" not in negs


def test_popular_negatives_by_frequency():
    # Walk cat > dog > car > bus > bird > tree, skipping objects in the image or already asked.
    expected = {
        "i1.jpg": ["bus", "bird", "tree"], "i2.jpg": ["bus", "bird", "tree"],
        "i3.jpg": ["car", "bird", "tree"], "i4.jpg": ["car", "bus", "tree"],
        "i5.jpg": ["dog", "bird", "tree"], "i6.jpg": ["car", "bus", "bird"],
        "i7.jpg": ["cat", "dog", "tree"],
    }
    assert negatives(generate_pope_questions(GT, "popular", CFG)) == expected


def test_adversarial_negatives_by_cooccurrence():
    # Co-occurrence counts with each positive (over the 7 eligible images), e.g. cat: dog 5, car 3, bus 2,
    # bird 1, tree 1; car: cat 3, dog 2, bus 2, bird 1. Where counts tie, the official order depends on
    # first-seen order (i.e. the image sample), so only the set of the tied picks is fixed.
    neg = negatives(generate_pope_questions(GT, "adversarial", CFG))
    assert neg["i5.jpg"] == ["dog", "bird", "tree"]  # bus: all partners used -> random fallback = tree
    assert neg["i7.jpg"] == ["cat", "dog", "tree"]
    for img, first, rest in [("i1.jpg", "bus", {"bird", "tree"}), ("i2.jpg", "bus", {"bird", "tree"}),
                             ("i3.jpg", "car", {"bird", "tree"}), ("i4.jpg", "car", {"bus", "tree"}),
                             ("i6.jpg", "car", {"bus", "bird"})]:
        assert neg[img][0] == first
        assert set(neg[img][1:]) == rest


def test_adversarial_differs_from_popular():
    assert negatives(generate_pope_questions(GT, "adversarial", CFG)) != negatives(
        generate_pope_questions(GT, "popular", CFG))


def test_random_negatives_seeded_and_from_chosen_images():
    a = generate_pope_questions(GT, "random", CFG)
    assert a == generate_pope_questions(GT, "random", CFG)
    seen = set()
    for seed in range(12):
        qs = generate_pope_questions(GT, "random", PopeGenerationConfig(img_num=None, seed=seed))
        neg = negatives(qs)
        assert set(neg["i7.jpg"]) == {"cat", "dog", "tree"}  # the only 3 objects not in i7
        seen.add(tuple(neg["i1.jpg"]))
    assert len(seen) > 1  # different seeds -> different random negatives


def test_img_num_sampling_and_errors():
    qs = generate_pope_questions(GT, "popular", PopeGenerationConfig(img_num=6, seed=1))
    assert len(qs) == 36 and len({q.image for q in qs}) == 6
    with pytest.raises(EvalInputError, match="only 7 images have >= 3 objects but img_num=8"):
        generate_pope_questions(GT, "popular", PopeGenerationConfig(img_num=8))
    with pytest.raises(EvalInputError, match="unknown POPE split 'hard'"):
        generate_pope_questions(GT, "hard", CFG)
    with pytest.raises(EvalInputError, match="empty ground-truth"):
        generate_pope_questions([], "random", CFG)


def test_no_object_left_for_negative_is_an_error():
    tiny = [{"image": "a.jpg", "objects": ["x", "y", "z"]}, {"image": "b.jpg", "objects": ["x", "y", "w"]}]
    with pytest.raises(EvalInputError, match="no object left for a negative"):
        generate_pope_questions(tiny, "random", PopeGenerationConfig(img_num=None))


def test_template_article():
    assert question_text("Is there a {} in the image?", "apple") == "Is there an apple in the image?"
    assert question_text("Is there a {} in the image?", "dog") == "Is there a dog in the image?"


def test_written_files_roundtrip(tmp_path):
    paths = write_pope_files(GT, tmp_path, PopeGenerationConfig(img_num=None, seed=3, dataset="toy"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "toy_co_occur.json", "toy_ground_truth_objects.json", "toy_pope_adversarial.json",
        "toy_pope_popular.json", "toy_pope_random.json"]
    for split, path in paths.items():
        loaded = load_pope_file(path)
        assert loaded.split == split
        expected = generate_pope_questions(GT, split, PopeGenerationConfig(img_num=None, seed=3))
        assert loaded.questions == expected
        assert loaded.files[0].n == 42
    # same images and positives in all three splits
    pos = {s: [(q.image, q.text) for q in load_pope_file(p).questions if q.label == "yes"]
           for s, p in paths.items()}
    assert pos["random"] == pos["popular"] == pos["adversarial"]
