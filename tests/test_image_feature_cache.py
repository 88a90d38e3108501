"""The LLaVA adapter encodes each distinct image once (``ImageFeatureCache``): the features and the greedy tokens
are those of the model's own path (oracle: the same requests with a no-op hook on the vision tower, which
turns the cache off), and a hooked tower is never served from the cache."""

from __future__ import annotations

import pytest
import torch

from clearsight import DecodeSpec, generate, load_model
from clearsight.evals.datasets.shapes import ShapesWorldSpec, generate_scenes, render_scene


@pytest.fixture(scope="module")
def lvlm():
    return load_model("builtin:shapes-llava")


@pytest.fixture(scope="module")
def images():
    spec = ShapesWorldSpec(n_images=2, seed=4242)
    return [render_scene(sc, spec) for sc in generate_scenes(spec)]


QUESTIONS = ["Is there a star in the image?", "Is there a red circle in the image?", "Describe the image."]


def _requests(images):
    # every image asked several times, in one batch: duplicates within a prefill and across prefills
    return [{"prompt": q, "image": im} for q in QUESTIONS for im in images]


def _run(lvlm, requests, mitigations=(), hooked=False):
    handle = lvlm.adapter.vision_tower.register_forward_hook(lambda *a: None) if hooked else None
    try:
        return [r.token_ids for r in generate(lvlm, requests, mitigations, decode=DecodeSpec(max_new_tokens=6),
                                              max_batch=4)]
    finally:
        if handle is not None:
            handle.remove()


def test_features_bit_identical_to_the_models_own(lvlm, images):
    ad = lvlm.adapter
    ad.image_features.clear()
    batch = ad.encode([ad.chat_prompt("q", 1)] * 5, [images[0], images[1], images[0], images[1], images[1]])
    with torch.inference_mode():
        own = lvlm.model.model.get_image_features(pixel_values=batch["pixel_values"], return_dict=True).pooler_output
        ours = ad.forward_inputs(batch)["mm_encoder_outputs"]["image"].pooler_output
        again = ad.forward_inputs(batch)["mm_encoder_outputs"]["image"].pooler_output
    assert len(ours) == len(own) == 5
    assert all(torch.equal(a, b) for a, b in zip(own, ours))
    assert all(torch.equal(a, b) for a, b in zip(own, again))
    assert ad.image_features.hits == 5 and len(ad.image_features._items) == 2  # 2 distinct images, encoded once


@pytest.mark.parametrize("mitigations", [(), ("vcd",), ("pai",), ("agla",)])
def test_greedy_tokens_equal_the_uncached_path(lvlm, images, mitigations):
    lvlm.adapter.image_features.clear()
    ours = _run(lvlm, _requests(images), mitigations)
    assert lvlm.adapter.image_features.hits > 0
    assert ours == _run(lvlm, _requests(images), mitigations, hooked=True)


def test_hooked_tower_bypasses_the_cache(lvlm, images):
    cache = lvlm.adapter.image_features
    cache.clear()
    before = (cache.hits, cache.misses)
    _run(lvlm, _requests(images), ("causalmm:level=vision",))  # its counterfactual hooks the tower
    assert (cache.hits, cache.misses) == before


def test_cls_attentions_are_the_towers_own(lvlm, images):
    ad = lvlm.adapter
    pixels = ad.encode([ad.chat_prompt("q", 1)], [images[0]])["pixel_values"]
    with torch.inference_mode():
        own = ad.vision_attentions(pixels)
        first, again = ad.vision_cls_attentions(pixels), ad.vision_cls_attentions(pixels)
    assert len(first) == len(own)
    assert all(torch.equal(a[:, :, 0], b) and torch.equal(b, c) for a, b, c in zip(own, first, again))
    assert ad._cls_rows.hits >= 1


def test_cache_is_bounded():
    from clearsight.models.adapters import ImageFeatureCache

    cache = ImageFeatureCache(max_bytes=3 * 4 * 10)
    for i in range(5):
        cache.put(("k", i), torch.full((10,), float(i)))
    assert cache.get(("k", 0)) is None and cache.get(("k", 1)) is None
    assert torch.equal(cache.get(("k", 4)), torch.full((10,), 4.0))
