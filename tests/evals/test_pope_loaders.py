"""POPE loaders for every layout, provenance (sha256, N) and bad-input errors."""

import hashlib
import json

import pytest

from clearsight.evals import EvalInputError, load_llava_pope, load_pope_file, load_pope_parquet
from clearsight.evals.datasets.pope import check_images

ROWS = [
    {"question_id": 1, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a cat in the image?",
     "label": "yes"},
    {"question_id": 2, "image": "COCO_val2014_000000000001.jpg", "text": "Is there a dog in the image?",
     "label": "no"},
    {"question_id": 3, "image": "COCO_val2014_000000000002.jpg", "text": "Is there an apple in the image?",
     "label": "yes"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_official_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "coco_pope_random.json", ROWS)
    s = load_pope_file(p)
    assert s.split == "random" and s.n == 3
    assert [q.label for q in s.questions] == ["yes", "no", "yes"]
    assert s.files[0].sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert s.files[0].n == 3 and s.files[0].layout == "jsonl"


def test_seem_json_array(tmp_path):
    p = tmp_path / "aokvqa_pope_seem_adversarial.json"
    p.write_text(json.dumps(ROWS, indent=4))
    s = load_pope_file(p)
    assert s.split == "adversarial" and s.n == 3 and s.files[0].layout == "json-array"
    assert s.questions[2].text == "Is there an apple in the image?"


def test_llava_concatenated_with_label_files(tmp_path):
    rows = [{"question_id": r["question_id"] + k * 10, "image": r["image"], "text": r["text"], "category": c}
            for k, c in enumerate(["adversarial", "popular", "random"]) for r in ROWS]
    p = write_jsonl(tmp_path / "llava_pope_test.jsonl", rows)
    labels = {}
    for k, c in enumerate(["adversarial", "popular", "random"]):
        labels[c] = write_jsonl(tmp_path / f"coco_pope_{c}.json",
                                [dict(r, question_id=r["question_id"] + k * 10) for r in ROWS])
    sets = load_llava_pope(p, label_files=labels)
    assert set(sets) == {"adversarial", "popular", "random"}
    assert sets["popular"].n == 3
    assert [q.label for q in sets["popular"].questions] == ["yes", "no", "yes"]
    assert [q.question_id for q in sets["random"].questions] == [21, 22, 23]
    assert len(sets["random"].files) == 2  # the LLaVA file and the label file, both hashed
    # Without label files the questions are loaded unlabeled.
    assert load_llava_pope(p)["random"].questions[0].label is None


def test_llava_mismatched_ids(tmp_path):
    p = write_jsonl(tmp_path / "llava_pope_test.jsonl", [dict(r, category="random") for r in ROWS])
    lab = write_jsonl(tmp_path / "coco_pope_random.json", ROWS[:2])
    with pytest.raises(EvalInputError, match=r"1 random question ids \(first: 3\) are not in label file"):
        load_llava_pope(p, label_files={"random": lab})


def test_parquet_layout(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    cats = ["random", "random", "popular", "adversarial"]
    table = pa.table({
        "id": ["0", "1", "2", "3"],
        "question_id": ["1", "2", "1", "1"],
        "question": ["Is there a cat in the image?", "Is there a dog in the image?",
                     "Is there a car in the image?", "Is there a bus in the image?"],
        "answer": ["yes", "no", "no", "yes"],
        "image_source": ["COCO_val2014_000000000001", "COCO_val2014_000000000001",
                         "COCO_val2014_000000000002", "COCO_val2014_000000000003"],
        "image": [{"bytes": b"\x89PNG-fake-%d" % i, "path": None} for i in range(4)],
        "category": cats,
    })
    path = tmp_path / "test-00000-of-00001.parquet"
    pq.write_table(table, path)
    sets = load_pope_parquet(path)
    assert {k: v.n for k, v in sets.items()} == {"random": 2, "popular": 1, "adversarial": 1}
    q = sets["random"].questions[1]
    assert (q.question_id, q.label, q.image, q.image_bytes) == ("2", "no", "COCO_val2014_000000000001",
                                                                 b"\x89PNG-fake-1")
    assert sets["random"].files[0].sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    only = load_pope_parquet([path], split="popular")
    assert list(only) == ["popular"]
    with pytest.raises(EvalInputError, match="unknown POPE split 'middle'"):
        load_pope_parquet(path, split="middle")


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "coco_pope_popular.json"
    p.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{\"question_id\": 3, \"ima\n")
    with pytest.raises(EvalInputError, match=r"coco_pope_popular\.json: malformed JSON on line 3"):
        load_pope_file(p)


def test_bad_inputs(tmp_path):
    with pytest.raises(EvalInputError, match="POPE question file not found"):
        load_pope_file(tmp_path / "nope_random.json")
    empty = tmp_path / "coco_pope_random.json"
    empty.write_text("\n")
    with pytest.raises(EvalInputError, match="empty POPE file"):
        load_pope_file(empty)
    unnamed = write_jsonl(tmp_path / "questions.jsonl", ROWS)
    with pytest.raises(EvalInputError, match="cannot tell the split"):
        load_pope_file(unnamed)
    with pytest.raises(EvalInputError, match="unknown POPE split 'medium'"):
        load_pope_file(unnamed, split="medium")
    bad_label = write_jsonl(tmp_path / "x_random.json", [dict(ROWS[0], label="maybe")])
    with pytest.raises(EvalInputError, match="record 1 has label 'maybe'"):
        load_pope_file(bad_label)
    no_field = write_jsonl(tmp_path / "y_random.json", [{"question_id": 1, "image": "a.jpg", "label": "yes"}])
    with pytest.raises(EvalInputError, match="record 1 has no field 'text'"):
        load_pope_file(no_field)
    dup = write_jsonl(tmp_path / "z_random.json", [ROWS[0], ROWS[0]])
    with pytest.raises(EvalInputError, match="question_id 1 occurs twice"):
        load_pope_file(dup)


def test_missing_image(tmp_path):
    p = write_jsonl(tmp_path / "coco_pope_random.json", ROWS)
    imgs = tmp_path / "val2014"
    imgs.mkdir()
    (imgs / "COCO_val2014_000000000001.jpg").write_bytes(b"x")
    msg = r"COCO_val2014_000000000002\.jpg not found \(1 missing in all\)"
    with pytest.raises(EvalInputError, match=msg):
        load_pope_file(p, image_dir=imgs)
    (imgs / "COCO_val2014_000000000002.jpg").write_bytes(b"x")
    assert load_pope_file(p, image_dir=imgs).n == 3
    with pytest.raises(EvalInputError, match="image folder not found"):
        check_images(load_pope_file(p).questions, tmp_path / "missing_dir")
