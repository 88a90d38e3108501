"""The compatibility matrix: which mitigation runs on which model family, or its one-line refusal.

Each mitigation configuration lists the adapter capabilities it needs (``models.adapters.CAPABILITIES``);
a cell is "works" when the family's adapter has them all, else the reason of the first one missing. The
mitigations themselves refuse on the same capabilities at run time (tests/test_families.py walks the
matrix and checks that each cell's verdict is what the mitigation does).

>>> from clearsight.mitigations.compat import compatibility_matrix
>>> compatibility_matrix()["cca"]["qwen2_vl"]
'refused: needs 1-D position ids (this family uses 3-D M-RoPE positions)'
"""

from __future__ import annotations

from clearsight.models.adapters import ADAPTERS, Adapter

WORKS = "works"

# mitigation configuration -> ((capability, what the mitigation needs when the capability is missing), ...)
REQUIREMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "none": (),
    "vcd": (),
    "m3id": (),
    "pai": (),
    "agla": (("image_grid_2d", "its attention matcher needs a 2-D grid of image tokens (give clip_path)"),),
    "vhr": (),
    "var": (),
    "mma": (("causal_image_tokens", "sets the prompt mask (this family's image tokens attend bidirectionally)"),),
    "causalmm": (),
    "causalmm:level=vision": (
        ("vision_feature_hook", "needs a CLIP/SigLIP-style vision feature layer to hook (use level=llm)"),),
    "cca": (
        ("image_grid_2d", "needs a 2-D grid of image tokens (this family's are learned queries)"),
        ("single_grid_per_image", "needs one plain token grid per image (this family has anyres tiles)"),
        ("plain_1d_positions", "needs 1-D position ids (this family uses 3-D M-RoPE positions)"),
        ("causal_image_tokens", "sets the prompt mask (this family's image tokens attend bidirectionally)"),
    ),
    "imbalanced": (("image_grid_2d", "needs a 2-D grid of patch tokens to select (this family's are learned queries)"),
                   ("has_cls_vision_attention", "needs the vision tower's CLS->patch attention (no CLS token)")),
    "inter": (),
    "carve": (("image_grid_2d", "its maps are attention over a 2-D grid of image tokens (this family's are learned "
                                "queries)"),
              ("several_images_per_prompt", "final=both asks about two images in one prompt, which this family "
                                            "cannot tell apart (use final=refined)")),
    "carve:final=refined": (("image_grid_2d", "its maps are attention over a 2-D grid of image tokens (this "
                                              "family's are learned queries)"),),
}


def cell(mitigation: str, adapter: type[Adapter]) -> str:
    """"works", or "refused: <reason>" for the first capability the family lacks."""
    for capability, reason in REQUIREMENTS[mitigation]:
        if not getattr(adapter, capability):
            return f"refused: {reason}"
    return WORKS


def compatibility_matrix() -> dict[str, dict[str, str]]:
    """{mitigation configuration: {family: "works" | "refused: <reason>"}} over every supported family."""
    return {m: {a.family: cell(m, a) for a in ADAPTERS} for m in REQUIREMENTS}


def matrix_markdown() -> str:
    """The matrix as a Markdown table (the docs' copy is this function's output)."""
    families = [a.family for a in ADAPTERS]
    lines = ["| method | " + " | ".join(families) + " |", "|---" * (len(families) + 1) + "|"]
    for m, row in compatibility_matrix().items():
        lines.append(f"| {m} | " + " | ".join("yes" if row[f] == WORKS else row[f].removeprefix("refused: ")
                                                for f in families) + " |")
    return "\n".join(lines)
