"""CARVE: the mask, contrast, fusion and refined view by hand; the named shape kept on a shapes scene; the
re-query's images; mixed batches; refusals."""

from __future__ import annotations

import pytest
import torch
from mithelp import make_image, tiny
from PIL import Image

from clearsight import DecodeSpec, generate
from clearsight.errors import InputError
from clearsight.evals.datasets.shapes import ShapesWorldSpec, generate_scenes, render_scene
from clearsight.kernels.plan import PlanConflictError
from clearsight.mitigations import parse_mitigations
from clearsight.mitigations.carve import CARVE, carve_mask, contrast_maps, default_layers, fuse, refined_view

PROMPT = "is there a red circle?"
DECODE = DecodeSpec(max_new_tokens=3, ignore_eos=True)
SEEN: list[dict] = []


class RecCARVE(CARVE):
    """CARVE that records its mask and the main row's image spans."""

    def input_images(self, ctx):
        out = super().input_images(ctx)
        SEEN.append({"mask": ctx.state["carve"]["mask"], "view": ctx.state["carve"]["view"], "images": len(out)})
        return out

    def apply(self, ctx):
        SEEN[-1]["spans"] = len(ctx.layout().image_spans)


@pytest.fixture(autouse=True)
def _clear():
    SEEN.clear()


def test_mask_by_hand():
    s = torch.tensor([[9.0, 8, 0, 0, 1],
                      [7, 0, 0, 0, 0],
                      [0, 0, 0, 6, 0],
                      [0, 5, 0, 0, 4]])
    # 20 values sorted: thirteen 0, then 1 4 5 6 7 8 9; the 0.7 quantile sits at 0.7 * 19 = 13.3, between the
    # 14th (1) and 15th (4) values: tau = 1 + 0.3 * 3 = 1.9, so 1 is out. Components (4-connectivity): {9, 8, 7}
    # sum 24, {6} 6, {5} 5, {4} 4 ((2,3) and (3,4) touch only diagonally). floor(0.3 * 4) = 1 < k.
    want2 = torch.zeros(4, 5, dtype=torch.bool)
    want2[0, 0] = want2[0, 1] = want2[1, 0] = want2[2, 3] = True
    assert torch.equal(carve_mask(s, 0.3, 2), want2)
    want3 = want2.clone()
    want3[3, 1] = True
    assert torch.equal(carve_mask(s, 0.3, 3), want3)
    want1 = want2.clone()
    want1[2, 3] = False
    assert torch.equal(carve_mask(s, 0.3, 1), want1)
    # p * #components above k: floor(1.0 * 5) = 5 components of the 0.0 quantile (everything) = all pixels
    assert carve_mask(s, 1.0, 1).all()


def test_contrast_and_fusion_by_hand():
    task = torch.tensor([[[0.2, 0.1, 0.0, 0.3]], [[0.4, 0.0, 0.2, 0.2]], [[9.0, 9.0, 9.0, 9.0]]])  # [T=3, L=1, 4]
    general = torch.tensor([[[0.1, 0.1, 0.5, 0.3]], [[0.2, 0.1, 0.1, 0.4]]])  # T=2: the third task step is dropped
    c = contrast_maps(task, general, 1e-8)
    assert c.shape == (2, 1, 4)
    torch.testing.assert_close(c[0, 0], torch.tensor([2.0, 1.0, 0.0, 1.0], dtype=torch.float64), rtol=1e-6, atol=0)
    torch.testing.assert_close(c[1, 0], torch.tensor([2.0, 0.0, 2.0, 0.5], dtype=torch.float64), rtol=1e-6, atol=0)
    # a 2 x 2 grid at its own size (bilinear is the identity): S = 1 * c_1 + 2 * c_2, row-major
    s = fuse(c, (2, 2), (2, 2))
    torch.testing.assert_close(s, torch.tensor([[6.0, 1.0], [4.0, 2.0]], dtype=torch.float64), rtol=1e-6, atol=0)
    # two layers add up
    s2 = fuse(torch.cat([c, c], 1), (2, 2), (2, 2))
    torch.testing.assert_close(s2, 2 * s)


def test_refined_view_by_hand():
    img = Image.new("RGB", (8, 4), (200, 100, 50))
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[1:3, 2:4] = True  # a 2 x 2 region: crop 2 x 2, enlarged by max(8 / 2, 4 / 2) = 4 to 8 x 8
    view = refined_view(img, mask)
    assert view.size == (8, 8)
    assert view.getpixel((4, 4)) == (200, 100, 50)
    mask[1, 5] = True  # bounding box 4 wide, 2 tall: scale max(8 / 4, 4 / 2) = 2
    assert refined_view(img, mask).size == (8, 4)
    corners = torch.zeros(4, 8, dtype=torch.bool)
    corners[0, 0] = corners[3, 7] = True  # bounding box = the image: scale 1, the image times the mask exactly
    view = refined_view(img, corners)
    assert view.size == (8, 4) and view.getpixel((0, 0)) == view.getpixel((7, 3)) == (200, 100, 50)
    assert view.getpixel((1, 1)) == view.getpixel((7, 0)) == (0, 0, 0)
    # the box: the mask covers a region of the image, everything outside is dropped
    view = refined_view(img, torch.ones(2, 2, dtype=torch.bool), box=(4, 0, 6, 2))
    assert view.size == (8, 8)


def test_default_layers():
    assert default_layers(32) == default_layers(40) == [20, 21, 22, 23, 24, 25]
    assert default_layers(4) == [2, 3] and default_layers(16) == [10, 11, 12] and default_layers(1) == [0]


def test_the_named_shape_is_kept_on_a_shapes_scene():
    lvlm = tiny("shapes-llava")
    scenes = generate_scenes(ShapesWorldSpec(n_images=5, seed=7))
    for scene, index in ((scenes[0], 1), (scenes[4], 0)):  # a green cross among five shapes, a ring among five
        obj = scene.objects[index]
        spec = RecCARVE(final="refined", steps="first")
        generate(lvlm, [{"prompt": f"Is there a {obj.shape} in the image?", "image": render_scene(scene)}], [spec],
                 decode=DecodeSpec(max_new_tokens=1))
        mask = SEEN[-1]["mask"]
        x, y, w, h = obj.bbox
        assert mask.float().mean() < 0.35  # p = 0.2 of the pixels, whole components
        assert mask[y:y + h, x:x + w].float().mean() > 0.5, (obj.shape, obj.bbox)


def test_the_requery_holds_original_and_refined_or_the_refined_view():
    lvlm = tiny("tiny-qwen2-vl")
    req = {"prompt": PROMPT, "image": make_image(1)}
    generate(lvlm, [req], [RecCARVE(probe_tokens=2)], decode=DECODE)
    assert SEEN[-1]["images"] == 2 and SEEN[-1]["spans"] == 2
    generate(lvlm, [req], [RecCARVE(probe_tokens=2, final="refined")], decode=DECODE)
    assert SEEN[-1]["images"] == 1 and SEEN[-1]["spans"] == 1
    # the re-query on the refined view alone is the request asked with that image
    want = generate(lvlm, [{"prompt": PROMPT, "image": SEEN[-1]["view"]}], decode=DECODE)[0].token_ids
    assert generate(lvlm, [req], ["carve:probe_tokens=2,final=refined"], decode=DECODE)[0].token_ids == want


def test_mixed_batch_equals_solo():
    lvlm = tiny("tiny-qwen2-vl")
    reqs = [
        {"prompt": PROMPT, "image": make_image(4), "mitigations": ["carve:probe_tokens=2"]},
        {"prompt": "describe the image please", "image": make_image(5), "mitigations": []},
        {"prompt": "what color is it", "image": make_image(6), "mitigations": ["carve:steps=first,final=refined"]},
        {"prompt": "what color is it", "mitigations": []},
    ]
    batched = [r.token_ids for r in generate(lvlm, reqs, decode=DECODE)]
    solo = [generate(lvlm, [r], decode=DECODE)[0].token_ids for r in reqs]
    assert batched == solo


def test_parameters():
    from clearsight.mitigations import parse_mitigation

    m = parse_mitigation("carve")
    assert (m.p, m.k, m.lam, m.steps, m.probe_tokens, m.final) == (0.2, 3, 1e-8, "all", 32, "both")
    assert parse_mitigation("carve:suffix=none").suffix is None


def test_refusals():
    with pytest.raises(PlanConflictError, match="'carve' and 'vcd' cannot be combined.*carve:final=refined"):
        parse_mitigations(["carve", "vcd"])
    assert [m.name for m in parse_mitigations(["carve:final=refined", "vcd"])] == ["carve", "vcd"]
    with pytest.raises(InputError, match="carve needs an image"):
        generate(tiny("tiny-llava"), [{"prompt": PROMPT}], ["carve"], decode=DECODE)
    with pytest.raises(InputError, match="carve:final=both asks about two images in one prompt, which llava_next"):
        generate(tiny("tiny-llava-next"), [{"prompt": PROMPT, "image": make_image(2)}], ["carve:steps=first"],
                 decode=DECODE)
