"""CHAIR on a hand-made COCO-format annotation set; expected values computed by hand (see comments)."""

import json

import pytest

from clearsight.evals import (
    ChairVocabulary,
    EvalInputError,
    build_ground_truth,
    compute_chair,
    drop_incomplete_sentence,
    load_captions_file,
    sample_image_ids,
)
from clearsight.evals.metrics.chair import chair_measures

CATS = {1: "person", 3: "car", 5: "airplane", 7: "train", 18: "dog", 22: "elephant", 32: "tie",
        46: "wine glass", 67: "dining table", 70: "toilet"}
INSTANCES = {1: [18, 1], 2: [22], 3: [7], 4: [70], 5: [1], 6: [1, 32], 7: [67, 46], 8: []}
HUMAN = {
    1: "A man walks his dog.",
    2: "A baby elephant in the grass.",  # "baby elephant" -> elephant: must not add person
    3: "A passenger train on the train tracks.",
    4: "A white toilet with the seat up.",  # toilet + seat: seat dropped, no chair
    5: "A batter stands at home plate.",
    6: "A man wearing a bow tie.",
    7: "Two wine glasses on a table.",
    8: "An empty street.",
}
GT = {1: {"dog", "person"}, 2: {"elephant"}, 3: {"train"}, 4: {"toilet"}, 5: {"person"},
      6: {"person", "tie"}, 7: {"dining table", "wine glass"}, 8: set()}

GENERATED = {
    1: "Two dogs and a puppy play with a man. A cat sleeps.",  # dog, dog, person, cat* (repeats kept)
    2: "A baby elephant and an adult elephant near a passenger jet.",  # elephant, elephant, airplane*
    3: "A passenger train on train tracks next to a traffic light.",  # train, traffic light*
    4: "The toilet seat is next to a sink and the seat is down.",  # toilet, sink*
    5: "A player at home plate.",  # person
    6: "A man in a suit.",  # person
    7: "Two wine glasses and a hot dog on the dining table.",  # wine glass, hot dog*, dining table
    8: "A street with no cars.",  # car*
}


@pytest.fixture()
def coco(tmp_path):
    images = [{"id": i, "file_name": f"COCO_val2014_{i:012d}.jpg"} for i in INSTANCES]
    anns = [{"id": 100 * i + k, "image_id": i, "category_id": c, "bbox": [0, 0, 1, 1]}
            for i, cs in INSTANCES.items() for k, c in enumerate(cs)]
    inst = {"images": images, "annotations": anns,
            "categories": [{"id": k, "name": v} for k, v in CATS.items()]}
    caps = {"images": images,
            "annotations": [{"id": i, "image_id": i, "caption": c} for i, c in HUMAN.items()]}
    ip, cp = tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"
    ip.write_text(json.dumps(inst))
    cp.write_text(json.dumps(caps))
    return ip, cp


def test_ground_truth_from_instances_and_captions(coco):
    ip, cp = coco
    assert build_ground_truth([ip], [cp]) == GT


def test_chair_hand_computed(coco):
    ip, cp = coco
    res = compute_chair(GENERATED, build_ground_truth([ip], [cp]))
    # mentions per caption 4+3+2+2+1+1+3+1 = 17; hallucinated 1+1+1+1+0+0+1+1 = 6 (6 captions)
    assert (res.n_mentions, res.n_hallucinated_mentions, res.n_hallucinated_captions) == (17, 6, 6)
    assert res.chair_i == pytest.approx(6 / 17)
    assert res.chair_s == pytest.approx(6 / 8)
    # recall: distinct GT objects mentioned 2+1+1+1+1+1+2+0 = 9 of |GT| 2+1+1+1+1+2+2+0 = 10
    assert res.recall == pytest.approx(9 / 10)
    # words: 12+11+11+13+5+5+11+5 = 73
    assert res.mean_length == pytest.approx(73 / 8)
    per = {p["image_id"]: p for p in res.per_caption}
    # (singularised word, node word), in order, repeats kept
    assert per[1]["mentions"] == [("dog", "dog"), ("puppy", "dog"), ("man", "person"), ("cat", "cat")]
    assert per[3]["recalled"] == ["train"] and per[8]["gt_objects"] == []
    assert {i: p["hallucinated_words"] for i, p in per.items() if p["hallucinated_words"]} == {
        1: ["cat"], 2: ["jet"], 3: ["traffic light"], 4: ["sink"], 7: ["hot dog"], 8: ["car"]}
    # a whole row, as results.json keeps it (every key: a renamed one loses the field for its readers)
    assert per[2] == {"image_id": 2, "caption": GENERATED[2],
                      "mentions": [("elephant", "elephant"), ("elephant", "elephant"), ("jet", "airplane")],
                      "hallucinated": [("jet", "airplane")], "hallucinated_words": ["jet"], "recalled": ["elephant"],
                      "gt_objects": ["elephant"], "n_words": 11}


def test_special_rules_and_plurals():
    v = ChairVocabulary.coco()
    assert v.objects("A baby dog and an adult cat.") == ["dog", "cat"]  # no person from baby/adult
    assert v.objects("A baby with a dog.") == ["person", "dog"]  # plain "baby" is a person
    assert v.objects("A passenger jet and a passenger train.") == ["airplane", "train"]
    assert v.objects("A passenger waits.") == ["person"]
    assert v.objects("He wears a bow tie.") == ["tie"]  # one mention, not bow + tie
    assert v.objects("The toilet seat is up.") == ["toilet"]
    assert v.objects("A seat next to the toilet.") == ["toilet"]  # seat dropped when toilet present
    assert v.objects("A seat by the window.") == ["chair"]
    assert v.objects("A dog walks along the train tracks.") == ["dog"]  # train track is not a train
    assert v.merge_phrases(["at", "home", "plate"]) == ["at", "home plate"]
    assert v.objects("Buses, mice, knives and two women.") == ["bus", "mouse", "knife", "person"]
    assert v.objects("Hot dogs by teddy bears and cell phones.") == ["hot dog", "teddy bear", "cell phone"]
    assert v.objects("A stove top oven.") == ["oven"]  # three-word compound
    assert v.objects("A dog, a dog and a puppy.") == ["dog", "dog", "dog"]


def test_coco_vocabulary_package_data():
    v = ChairVocabulary.coco()
    assert len(v.categories) == 80
    assert len({c.name for c in v.categories}) == 80
    assert v.inverse["televison"] == "tv" and v.inverse["table"] == "dining table"
    assert v.inverse["motor bike"] == "motorcycle" and v.inverse["iphone"] == "cell phone"
    assert "train track" in v.compounds and "home plate" in v.compounds


def test_truncation():
    assert drop_incomplete_sentence("A cat sits. A dog is on the") == "A cat sits."
    assert drop_incomplete_sentence("A cat sits! Done?  ") == "A cat sits! Done?"
    assert drop_incomplete_sentence("no sentence end") == ""
    gt = {1: {"cat"}}
    full = compute_chair({1: "A cat sits. A dog is on the"}, gt)
    short = compute_chair({1: "A cat sits. A dog is on the"}, gt, drop_incomplete=True)
    assert (full.chair_s, short.chair_s) == (1.0, 0.0)
    assert short.truncated and short.mean_length == 3


def test_ground_truth_cache_is_reused_and_invalidated(coco, tmp_path):
    ip, cp = coco
    cache = tmp_path / "gt_cache.json"
    gt = build_ground_truth([ip], [cp], image_ids=[1, 2], cache_path=cache)
    assert gt == {1: GT[1], 2: GT[2]}
    data = json.loads(cache.read_text())
    assert data["objects"] == {"1": ["dog", "person"], "2": ["elephant"]}
    data["objects"]["1"] = ["zebra"]  # tamper: a reused cache returns the tampered value
    cache.write_text(json.dumps(data))
    assert build_ground_truth([ip], [cp], image_ids=[1, 2], cache_path=cache)[1] == {"zebra"}
    # Changing the annotation file changes the key: recomputed.
    caps = json.loads(cp.read_text())
    caps["annotations"].append({"id": 99, "image_id": 1, "caption": "A cat."})
    cp.write_text(json.dumps(caps))
    assert build_ground_truth([ip], [cp], image_ids=[1, 2], cache_path=cache)[1] == {"dog", "person", "cat"}


def test_bad_inputs(coco, tmp_path):
    ip, cp = coco
    with pytest.raises(EvalInputError, match="COCO instance annotation file not found"):
        build_ground_truth([tmp_path / "instances_train2014.json"], [cp])
    with pytest.raises(EvalInputError, match="image id 999 .* is not in the annotation files"):
        build_ground_truth([ip], [cp], image_ids=[1, 999])
    with pytest.raises(EvalInputError, match="has no ground truth"):
        compute_chair({5: "A dog."}, {1: {"dog"}})
    with pytest.raises(EvalInputError, match="no captions"):
        compute_chair({}, {1: {"dog"}})
    bad = json.loads(ip.read_text())
    bad["categories"].append({"id": 999, "name": "spaceship"})
    bad["annotations"].append({"id": 5, "image_id": 1, "category_id": 999})
    ip.write_text(json.dumps(bad))
    with pytest.raises(EvalInputError, match="'spaceship'.*not in CHAIR vocabulary 'coco'"):
        build_ground_truth([ip], [cp])
    broken = tmp_path / "broken.json"
    broken.write_text('{"images": [')
    with pytest.raises(EvalInputError, match=r"broken\.json: malformed JSON at line 1"):
        build_ground_truth([broken], [cp])
    not_coco = tmp_path / "not_coco.json"
    not_coco.write_text(json.dumps({"images": []}))
    empty = tmp_path / "empty_instances.json"  # a valid file with no images (ip now has a bad category)
    empty.write_text(json.dumps({"images": [], "annotations": [], "categories": []}))
    for files in ([not_coco], [cp]), ([empty], [not_coco]):
        with pytest.raises(EvalInputError) as err:
            build_ground_truth(*files)
        assert str(err.value) == f"{not_coco}: not a COCO annotation file (needs 'images' and 'annotations')"


def test_caption_file_and_image_sampling(coco, tmp_path):
    ip, _ = coco
    f = tmp_path / "caps.jsonl"
    f.write_text('{"image_id": 1, "caption": "A dog."}\n{"image_id": 2, "caption": "x"}\n')
    assert load_captions_file(f) == [(1, "A dog."), (2, "x")]
    f.write_text('{"image_id": 1, "caption": "A dog."}\n{"image_id": 2, "capt\n')
    with pytest.raises(EvalInputError, match=r"caps\.jsonl: malformed JSON on line 2"):
        load_captions_file(f)
    ids = sample_image_ids(ip, n=3, seed=0)
    assert ids == sample_image_ids(ip, n=3, seed=0) and len(set(ids)) == 3 and set(ids) <= set(INSTANCES)
    with pytest.raises(EvalInputError, match="cannot sample 9"):
        sample_image_ids(ip, n=9)


def test_custom_vocabulary_entries_are_normalised_and_phrases_merged():
    """As the module docstring says: entries are stripped and lowercased, multi-word entries match whole."""
    from clearsight.evals.metrics.chair import ChairVocabulary

    v = ChairVocabulary.model_validate({"name": "t", "categories": [
        {"name": "iPhone", "synonyms": [" Mobile  Phone"]}, {"name": "motorcycle", "synonyms": [" motor bike"]}]})
    assert v.objects("An iphone, a mobile phone and a motor bike.") == ["iphone", "iphone", "motorcycle"]
    assert v.objects("A phone and a bike.") == []


def test_possessive_s_is_split_off_as_nltk_does(tmp_path):
    """NLTK's word_tokenize turns "dog's" into "dog" + "'s": the dog is mentioned, on both sides."""
    from clearsight.evals.metrics.chair import tokenize

    assert tokenize("The dog's owner.") == ["the", "dog", "'s", "owner", "."]
    assert tokenize("The dogs' bowl isn't here.") == ["the", "dogs", "'", "bowl", "is", "n't", "here", "."]
    v = ChairVocabulary.coco()
    assert v.objects("The dog's owner sits in the car's back seat.") == ["dog", "car", "chair"]
    # ground-truth side: the only dog of image 1 is in a human caption's possessive
    images = [{"id": 1, "file_name": "a.jpg"}]
    inst = {"images": images, "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [0, 0, 1, 1]}],
            "categories": [{"id": 3, "name": "car"}]}
    caps = {"images": images, "annotations": [{"id": 1, "image_id": 1, "caption": "A dog's head out of a car."}]}
    ip, cp = tmp_path / "instances_val2014.json", tmp_path / "captions_val2014.json"
    ip.write_text(json.dumps(inst))
    cp.write_text(json.dumps(caps))
    gt = build_ground_truth([ip], [cp])
    assert gt == {1: {"car", "dog"}}
    # caption side: "the dog's" mentions dog (present, not hallucinated); the cat's is hallucinated
    res = compute_chair({1: "The dog's ears and the cat's tail."}, gt)
    assert (res.n_mentions, res.n_hallucinated_mentions) == (2, 1)
    assert res.per_caption[0]["hallucinated_words"] == ["cat"]


def test_outside_jsonl_gives_the_same_chair_as_the_cache(tmp_path, shapes_cache, capsys):
    """Captions generated elsewhere (a JSON-lines file of image id + text) score exactly as the same texts do
    from a run's cache; with no model, through `clearsight eval chair --outputs`."""
    from clearsight.cli import main
    from clearsight.evals.cache import GenerationCache
    from clearsight.evals.job import parse_job
    from clearsight.evals.runner import run_job

    run = tmp_path / "run"
    job = parse_job({"systems": [{"name": "none", "model": "builtin:tiny-llava"}], "output": str(run),
                     "benchmarks": [{"kind": "chair", "n_images": 4, "max_new_tokens": 12}]})
    run_job(job, progress=None)
    records = [{"image_id": int(r["sample_id"].split("/")[1]), "caption": r["output"]}
               for r in GenerationCache(run / "generations.jsonl")]
    assert len(records) == 4
    path = tmp_path / "theirs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[::-1]))  # any order
    assert main(["eval", "chair", "--outputs", str(path), "--output", str(tmp_path / "ext"), "--no-progress"]) == 0
    assert "| theirs |" in capsys.readouterr().out
    ours = json.loads((run / "results.json").read_text())
    theirs = json.loads((tmp_path / "ext" / "results.json").read_text())
    assert theirs["systems"][0]["chair"] == ours["systems"][0]["chair"]
    assert theirs["chair_image_ids"] == sorted(ours["chair_image_ids"])
    path.write_text('{"image_id": 1}\n')
    assert main(["eval", "chair", "--outputs", str(path), "--output", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "record 1 needs an id" in err and len(err.strip().splitlines()) == 1


def test_caption_files_and_sampling_edges(coco, tmp_path):
    """Metrics mutation survivors (docs/testing.md): a JSON array (after leading blanks), the messages in
    full, records counted from 1, a record lacking only one key, exactly n images, the default n and seed."""
    ip, _ = coco
    f = tmp_path / "caps.json"
    f.write_text('\n  [{"image_id": 1, "caption": "A dog."}, {"image_id": 2, "caption": "x"}]')
    assert load_captions_file(f) == [(1, "A dog."), (2, "x")]
    f.write_text('[{"image_id": 1, "caption": "A dog."}, {"image_id": 2}]')
    with pytest.raises(EvalInputError) as err:
        load_captions_file(f)
    assert str(err.value) == f"{f}: record 2 lacks 'image_id' or 'caption'"
    f.write_text("\n\n")
    with pytest.raises(EvalInputError) as err:
        load_captions_file(f)
    assert str(err.value) == f"{f}: empty caption file; generate captions first"
    f.write_text('{"image_id": 1, "capt\n')
    with pytest.raises(EvalInputError) as err:
        load_captions_file(f)
    assert str(err.value).startswith(f"{f}: malformed JSON on line 1 (") and str(err.value).endswith("fix that line")
    with pytest.raises(EvalInputError) as err:
        load_captions_file(tmp_path / "none.jsonl")
    assert "caption file" in str(err.value) and "check the path" in str(err.value)
    assert sorted(sample_image_ids(ip, n=len(INSTANCES))) == sorted(INSTANCES)  # exactly n: all of them
    with pytest.raises(EvalInputError, match="only 8 images, cannot sample 500; lower n"):
        sample_image_ids(ip)  # the default n is 500
    assert sample_image_ids(ip, n=3) == sample_image_ids(ip, n=3, seed=0) != sample_image_ids(ip, n=3, seed=1)
    with pytest.raises(EvalInputError, match="COCO annotation file"):
        sample_image_ids(tmp_path / "none.json")


def test_vocabulary_load_from_a_file_none_and_bad_files(tmp_path):
    """``ChairVocabulary.load``: None is the COCO package data; a file is read with its entries normalised;
    a missing, malformed or wrongly shaped file is a one-line error naming the file and the fix."""
    assert ChairVocabulary.load(None).model_dump() == ChairVocabulary.coco().model_dump()
    assert ChairVocabulary.load().name == ChairVocabulary.coco().name
    good = tmp_path / "vocab.json"
    good.write_text(json.dumps({"name": "mine", "categories": [{"name": " Hot  Dog", "synonyms": ["Frank"]}],
                                "compounds": ["Fire  Truck"], "extra key": 1}))
    v = ChairVocabulary.load(good)
    assert (v.name, v.description, v.compounds, v.rewrites) == ("mine", "", ["fire truck"], {})
    assert [(c.name, c.synonyms) for c in v.categories] == [("hot dog", ["frank"])]
    assert ChairVocabulary.load(str(good)).model_dump() == v.model_dump()
    with pytest.raises(EvalInputError) as err:
        ChairVocabulary.load(tmp_path / "none.json")
    assert str(err.value) == f"CHAIR vocabulary file not found: {tmp_path / 'none.json'}; check the path"
    bad = tmp_path / "bad.json"
    bad.write_text('{"name": "x",\n "categories": [}')
    with pytest.raises(EvalInputError, match=r"bad.json: malformed JSON at line 2 column"):
        ChairVocabulary.load(bad)
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"name": "x"}))
    with pytest.raises(EvalInputError) as err:
        ChairVocabulary.load(wrong)
    assert str(err.value) == (f"{wrong}: not a CHAIR vocabulary (categories); see "
                              "clearsight/evals/data/coco_chair_vocab.json for the schema")
    assert "\n" not in str(err.value)


def test_chair_measures_per_caption_by_hand():
    """The per-caption outcomes the statistics use (no runner), from hand-made ``per_caption`` rows (not
    from ``compute_chair``): CHAIR_s, CHAIR_i, recall and, with a partner map, the partner measures."""
    def row(mentions, gt, recalled):
        return {"mentions": mentions, "hallucinated": [m for m in mentions if m[1] not in gt],
                "recalled": recalled, "gt_objects": gt}

    per = {
        # a: one of three mentions hallucinated; two "star"s where the circle's partner is absent (both partner
        #    mentions); nothing at all. b: nothing hallucinated; hourglass (the square's partner) and ring (no
        #    partner); a cat in an empty image (no ground truth, so no partner either)
        "a": [row([("dog", "dog"), ("cats", "cat"), ("man", "person")], ["dog", "person"], ["dog", "person"]),
              row([("star", "star"), ("star", "star")], ["circle", "square"], []),
              row([], [], [])],
        "b": [row([("dog", "dog")], ["dog", "person"], ["dog"]),
              row([("hourglass", "hourglass"), ("ring", "ring")], ["circle", "square"], []),
              row([("cat", "cat")], [], [])],
    }
    partners = {"square": "hourglass", "hourglass": "square", "circle": "star", "star": "circle"}
    got = [(m.benchmark, m.metric, m.split, m.kind, m.label, m.higher_is_better,
            {k: v.tolist() for k, v in m.num.items()}, {k: v.tolist() for k, v in m.den.items()})
           for m in chair_measures(per, partners, benchmark="shapes-chair")]
    ones = {"a": [1.0] * 3, "b": [1.0] * 3}
    assert got == [
        ("shapes-chair", "chair_s", None, "proportion", "CHAIR_s", False, {"a": [1.0, 1.0, 0.0], "b": [0.0, 1.0, 1.0]},
         ones),
        ("shapes-chair", "chair_i", None, "ratio", "CHAIR_i", False, {"a": [1.0, 2.0, 0.0], "b": [0.0, 2.0, 1.0]},
         {"a": [3.0, 2.0, 0.0], "b": [1.0, 2.0, 1.0]}),
        ("shapes-chair", "recall", None, "ratio", "recall", True, {"a": [2.0, 0.0, 0.0], "b": [1.0, 0.0, 0.0]},
         {"a": [2.0, 2.0, 0.0], "b": [2.0, 2.0, 0.0]}),
        ("shapes-chair", "partner_share", None, "ratio", "partner share of hallucinations", False,
         {"a": [0.0, 2.0, 0.0], "b": [0.0, 1.0, 0.0]}, {"a": [1.0, 2.0, 0.0], "b": [0.0, 2.0, 1.0]}),
        ("shapes-chair", "partner_captions", None, "proportion", "captions naming an absent partner", False,
         {"a": [0.0, 1.0, 0.0], "b": [0.0, 1.0, 0.0]}, ones),
    ]
    plain = chair_measures(per)
    assert [(m.benchmark, m.metric) for m in plain] == [("chair", "chair_s"), ("chair", "chair_i"), ("chair", "recall")]
    assert [m.num["b"].tolist() for m in plain] == [g[6]["b"] for g in got[:3]]


def test_ground_truth_image_list_filters_annotations_and_messages(tmp_path):
    """``build_ground_truth`` with an image list: only those images' annotations are read (another image's
    category outside the vocabulary is no error, and an unwanted image's annotation before a wanted one's
    does not end the scan); an image with nothing gets an empty set; files without categories; the messages
    in full. Small hand-made files: the captions name nothing, so the objects come from the instances."""
    inst = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"image_id": 2, "category_id": 99}, {"image_id": 1, "category_id": 18}],
            "categories": [{"id": 18, "name": "dog"}, {"id": 99, "name": "spaceship"}]}
    caps = {"images": [{"id": 1}, {"id": 2}, {"id": 3}],
            "annotations": [{"image_id": 1, "caption": "An empty street."}]}
    ip, cp = tmp_path / "instances.json", tmp_path / "captions.json"
    ip.write_text(json.dumps(inst))
    cp.write_text(json.dumps(caps))
    assert build_ground_truth([ip], [cp], image_ids=[3, 1]) == {1: {"dog"}, 3: set()}
    with pytest.raises(EvalInputError) as err:  # the whole file: image 2's spaceship
        build_ground_truth([ip], [cp])
    assert str(err.value) == (f"{ip}: annotation 0 has category 99 ('spaceship') that is not in CHAIR "
                              "vocabulary 'coco'; use the matching vocabulary")
    bare = tmp_path / "bare.json"  # no "categories" and no annotations: nothing from the instances
    bare.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    assert build_ground_truth([bare], [cp]) == {1: set(), 2: set(), 3: set()}  # the captions' images count too
    with pytest.raises(EvalInputError) as err:
        build_ground_truth([ip], [cp], image_ids=[1, 7])
    assert str(err.value) == (f"image id 7 (1 in all) is not in the annotation files {ip}, {cp}; "
                              "check the image list")
    with pytest.raises(EvalInputError) as err:
        build_ground_truth([], [cp])
    assert str(err.value) == "build_ground_truth: no instance annotation files given; pass at least one"
    with pytest.raises(EvalInputError) as err:
        build_ground_truth([tmp_path / "i.json"], [cp])
    assert str(err.value) == (f"COCO instance annotation file not found: {tmp_path / 'i.json'}; "
                              "pass instances_*2014.json paths")
    with pytest.raises(EvalInputError) as err:
        build_ground_truth([ip], [tmp_path / "c.json"])
    assert str(err.value) == (f"COCO caption annotation file not found: {tmp_path / 'c.json'}; "
                              "pass captions_*2014.json paths")
    only_annotations = tmp_path / "only_annotations.json"
    only_annotations.write_text(json.dumps({"annotations": []}))
    with pytest.raises(EvalInputError) as err:
        build_ground_truth([only_annotations], [cp])
    assert str(err.value) == f"{only_annotations}: not a COCO annotation file (needs 'images' and 'annotations')"


def test_ground_truth_cache_depends_on_the_vocabulary(tmp_path):
    """The cache key holds the vocabulary's digest: another vocabulary recomputes (its own objects)."""
    inst = {"images": [{"id": 1}], "annotations": [{"image_id": 1, "category_id": 1}],
            "categories": [{"id": 1, "name": "dog"}]}
    ip, cp = tmp_path / "instances.json", tmp_path / "captions.json"
    ip.write_text(json.dumps(inst))
    cp.write_text(json.dumps({"images": [{"id": 1}], "annotations": [{"image_id": 1, "caption": "A pup."}]}))
    mine = ChairVocabulary.model_validate({"name": "mine", "categories": [{"name": "dog", "synonyms": ["pup"]}]})
    other = ChairVocabulary.model_validate({"name": "mine", "categories": [{"name": "dog", "synonyms": []},
                                                                           {"name": "pup"}]})
    assert mine.sha256() != other.sha256()
    assert mine.sha256() == ChairVocabulary.model_validate(mine.model_dump()).sha256()
    cache = tmp_path / "gt.json"
    assert build_ground_truth([ip], [cp], vocab=mine, cache_path=cache) == {1: {"dog"}}
    assert build_ground_truth([ip], [cp], vocab=other, cache_path=cache) == {1: {"dog", "pup"}}


def test_compute_chair_edges_and_messages():
    """Captions as (id, text) pairs (what the benchmark passes) score as the mapping; no mentions and no
    ground truth give CHAIR_i 0 and recall 0 (no division by zero); the messages in full."""
    gt = {1: {"dog"}, 2: {"cat"}}
    pairs = compute_chair([(1, "A dog and a cat."), (2, "A cat.")], gt)
    assert pairs.model_dump() == compute_chair({1: "A dog and a cat.", 2: "A cat."}, gt).model_dump()
    assert (pairs.chair_i, pairs.recall) == (pytest.approx(1 / 3), 1.0)
    empty = compute_chair({1: "An empty street."}, {1: set()})
    assert (empty.chair_s, empty.chair_i, empty.recall, empty.n_mentions) == (0.0, 0.0, 0.0, 0)
    with pytest.raises(EvalInputError) as err:
        compute_chair({}, gt)
    assert str(err.value) == "compute_chair: no captions given; generate captions first"
    with pytest.raises(EvalInputError) as err:
        compute_chair({5: "A dog."}, gt)
    assert str(err.value) == "compute_chair: image id 5 has no ground truth; build it for the same image list"


def test_truncation_keeps_the_last_sentence_end_and_nothing_after():
    assert drop_incomplete_sentence("A dog. A cat. A bird") == "A dog. A cat."  # the last end, not the first
    assert drop_incomplete_sentence("  A dog. A") == "  A dog."  # only the end is cut
    assert drop_incomplete_sentence(". a dog") == "."  # an end at position 0
    assert drop_incomplete_sentence("A dog. An XL shirt") == "A dog."  # only . ! ? end a sentence


def test_vocabulary_words_are_never_singularised():
    """The module docstring: inflect would turn "bus" into "bu"; a vocabulary word stays as it is."""
    v = ChairVocabulary.coco()
    assert (v.singularize("bus"), v.singularize("glass"), v.singularize("dogs"), v.singularize("3d")) == (
        "bus", "glass", "dog", "3d")
    assert v.objects("A bus.") == ["bus"]


def test_sample_image_ids_messages(tmp_path):
    with pytest.raises(EvalInputError) as err:
        sample_image_ids(tmp_path / "none.json", n=1)
    assert str(err.value) == f"COCO annotation file not found: {tmp_path / 'none.json'}; check the path"
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({"images": []}))
    with pytest.raises(EvalInputError) as err:
        sample_image_ids(odd, n=1)
    assert str(err.value) == f"{odd}: not a COCO annotation file (needs 'images' and 'annotations')"


def test_caption_file_not_found_message(tmp_path):
    with pytest.raises(EvalInputError) as err:
        load_captions_file(tmp_path / "caps.jsonl")
    assert str(err.value) == f"caption file not found: {tmp_path / 'caps.jsonl'}; check the path"
