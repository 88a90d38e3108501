"""The mitigation base class and the request context mitigations write into.

A mitigation is a frozen pydantic model discriminated by ``name``. Given one request's context it
may (1) write AttentionPlan edits for the request's rows, (2) ask for extra branch rows (input
variants: no image, another image, another prompt) and combine the branches' next-token logits
per step, (3) calibrate through the adapter's hooks. It never touches model code.

Probes: a mitigation that needs a generation or a prefill of its own before the request's generation
(VAR's sink-dimension calibration, VHR's text-only pass, the imbalanced fix's head spread, AGLA's
attention matcher) runs it through ``ctx.probe``, a ``Probe`` that the decoding layer puts into the
context it builds (a nested inline scheduler on the same model and the request's backend). So this
package never imports the decoding layer: the layering rule (see ``tests/test_layering.py``) holds.
Outside a request context, ``probe_for(lvlm)`` gives the default probe of a model (registered by
the decoding layer when it is imported, see ``set_probe_factory``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict

from clearsight.kernels.plan import AttentionPlan, PlanConflictError, RowLayout

if TYPE_CHECKING:
    from clearsight.config import DecodeSpec, GenerationRequest
    from clearsight.kernels.plan import StatsRequest
    from clearsight.models.loader import LVLM

MAIN = "main"
SAME_IMAGE = "same"


class Probe(Protocol):
    """Runs requests through the model outside the request's own rows: ``generate``'s signature, bound to a model.

    ``requests``: prompts, request dicts (``{"prompt": ..., "image": path or PIL image}``) or
    GenerationRequests; ``mitigations``: as ``generate``'s (default: none, the unmitigated model);
    ``decode``: a DecodeSpec or a dict of its fields (None = the defaults); ``stats``: the attention
    statistics to record. Returns one result per request, in order (the decoding layer's ``GenerationResult``:
    ``text``, ``token_ids``, ``stats``...). Hooks installed on ``lvlm.adapter`` around the call see the probe's
    forwards (row 0 = the first request). Provided by the decoding layer's ``make_probe``.

    ``batched=True``: the caller reads nothing but the returned results (no hooks around the call), so the
    decoding layer may run this call together with other requests' probes before the request is prepared
    (``clearsight.decoding.probes``); the results are the same.
    """

    def __call__(self, requests: Sequence[Any] | Any, mitigations: Any = (), decode: Any = None, *,
                 stats: StatsRequest | None = None, batched: bool = False) -> list[Any]: ...


_probe_factory: Callable[[Any], Probe] | None = None


def set_probe_factory(factory: Callable[[Any], Probe]) -> None:
    """Register ``factory(lvlm) -> Probe``, the default probe of a model (the decoding layer registers its own)."""
    global _probe_factory
    _probe_factory = factory


def probe_for(lvlm: Any, probe: Probe | None = None) -> Probe:
    """``probe`` when given, else the default probe of ``lvlm`` (``set_probe_factory``)."""
    if probe is not None:
        return probe
    if _probe_factory is None:
        raise RuntimeError("no probe to run the model: import the decoding layer first (importing clearsight.generate "
                           "does), or pass probe=make_probe(lvlm), the decoding package's probe of the model")
    return _probe_factory(lvlm)


@dataclass(frozen=True)
class Branch:
    """An extra row of a request, run in the same batched forward as its main row.

    ``image``: ``"same"`` (the request's image), ``None`` (no image) or another PIL image.
    ``prompt``: None keeps the request's prompt ("" is an empty user turn). ``template``: True (default) puts
    ``prompt`` in the model's chat template as the request's prompt is; False = ``prompt`` is the row's whole
    text input, template not applied (it must then hold the image slot when the row has an image, e.g.
    INTER's prompt-removed row). A Branch may carry an image variant (``image`` / ``pixel_transform``) and a
    prompt variant at once. ``pixel_transform``: applied to this row's processed
    pixel values (the model's normalised input tensor for its image, e.g. VCD's diffusion noise).
    ``until_step``: the branch leaves the batch after this step (0 = it runs in the prefill only, as
    VHR's text-only row); None keeps it for the whole generation. Plan edits for the branch's row (for
    example a counterfactual) are written by the mitigation in
    ``apply`` through ``ctx.rows[name]``.
    ``receives_edits``: True (default) = the single-pass edits of the other mitigations of the request
    (PAI's boost, VAR, VHR's head scaling, CCA, MMA, the imbalanced-attention fix) apply to this row
    as to the main row, so a branch contrasts the *edited* model with an input variant. False = they
    leave this row alone, e.g. a measurement row that must see the unedited model (VHR's no-image row).
    Edits that depend on the image (all of the above except VHR's) are never written for a row
    without an image.
    """

    name: str
    image: Image.Image | str | None = SAME_IMAGE
    prompt: str | None = None
    template: bool = True
    pixel_transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    until_step: int | None = None
    receives_edits: bool = True


@dataclass
class RequestContext:
    """One request inside a batch: where its rows are and what they hold."""

    lvlm: LVLM
    request: GenerationRequest
    index: int  # position of the request in the call
    rows: dict[str, int]  # branch name -> batch row ("main" included)
    layouts: list[RowLayout]  # of the whole batch
    plan: AttentionPlan
    decode: DecodeSpec
    image: Image.Image | None
    inputs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the batch's encoded inputs
    state: dict[str, Any] = field(default_factory=dict)  # per-request scratch space of the mitigations
    step: int = 0  # the forward being run: 0 = prefill, t = decode step t (set by the loop)
    # branch row name ("<mitigation>.<branch>") -> its Branch (filled by the loop next to ``rows``)
    branch_specs: dict[str, Branch] = field(default_factory=dict)
    # runs probe generations on this request's model and backend (set by the decoding layer; None = the
    # model's default probe, see ``run_probe``)
    probe: Probe | None = None
    # says a warning about this request (``warn``); the decoding layer sets one that says each message once
    # per scheduler (an Engine's lifetime, one generate() call), so an eval does not repeat it per request
    warner: Callable[[str, type[Warning]], None] | None = None

    def warn(self, message: str, category: type[Warning] = UserWarning) -> None:
        """Warn about this request (through ``warner`` when set)."""
        if self.warner is not None:
            self.warner(message, category)
        else:
            warnings.warn(message, category, stacklevel=3)

    def run_probe(self, requests: Sequence[Any] | Any, mitigations: Any = (), decode: Any = None, *,
                  stats: StatsRequest | None = None, batched: bool = False) -> list[Any]:
        """Run a probe generation (see ``Probe``, and its ``batched``) with this request's probe."""
        return probe_for(self.lvlm, self.probe)(requests, mitigations, decode, stats=stats, batched=batched)

    @property
    def main_row(self) -> int:
        return self.rows[MAIN]

    @property
    def all_rows(self) -> list[int]:
        return sorted(self.rows.values())

    @property
    def edit_names(self) -> dict[str, int]:
        """Row name -> batch row of the rows that receive single-pass edits: the main row first, then every
        branch row whose Branch has ``receives_edits=True`` (in row order).

        A branch missing from ``branch_specs`` receives edits (the default of ``Branch``).
        """
        out = {MAIN: self.rows[MAIN]} if MAIN in self.rows else {}
        for name, row in sorted(self.rows.items(), key=lambda kv: kv[1]):
            if name == MAIN:
                continue
            spec = self.branch_specs.get(name)
            if spec is None or spec.receives_edits:
                out[name] = row
        return out

    @property
    def edit_rows(self) -> list[int]:
        """Batch rows that receive single-pass edits: the main row first, then the branch rows with
        ``receives_edits=True`` (see ``edit_names``)."""
        return list(self.edit_names.values())

    def layout(self, branch: str = MAIN) -> RowLayout:
        return self.layouts[self.rows[branch]]


def plan_owner(plan: AttentionPlan, what: str, layer: int, row: int) -> str | None:
    """Which mitigation claimed an exclusive plan field (``"segments"``, ``"counterfactual"``, ``"mask"``,
    ``"position ids"``, ``"redistribution"``; layer -1 for the mask and positions) of one row, if any.

    Lets a mitigation refuse an impossible combination up front, before any forward runs.
    """
    return plan.owner(what, layer, row)


def conflict(a: str, b: str, what: str, why: str) -> PlanConflictError:
    """The error of two mitigations that cannot be combined in one request (names both)."""
    return PlanConflictError(f"'{a}' and '{b}' both set the attention {what}; they cannot be combined in one "
                             f"request: {why}; drop one of them")


class Mitigation(BaseModel):
    """Base class. Subclasses set ``name: Literal["..."]`` and the paper's defaults as fields.

    Float parameters must be finite (``inf`` / ``nan`` are refused when the spec is validated).

    Composition is declared, so that ``parse_mitigations`` refuses an impossible combination before
    any model is loaded (``registry.check_compatible``); the plan's own ownership checks
    (``PlanConflictError``) stay as the safety net, and a test checks both agree for every pair:

    - ``plan_fields``: the exclusive AttentionPlan fields (``kernels.plan.EXCLUSIVE_FIELDS``) this
      method writes for the rows it edits, each with what it uses it for. Two methods that write
      the same one cannot be combined.
    - ``refuses_plan_fields``: exclusive fields no other method may write on the rows this one
      edits, each with why (e.g. the imbalanced-attention fix relabels the image keys that a
      counterfactual would replace).
    - ``abs_bias_rows``: the query rows (``QueryRows``) of the method's score-dependent image boost
      (``AttentionPlan.add_abs_bias``), None without one. Boosts add up only on the same query rows.
    - ``plan_rows``: which rows those fields are written for: ``"edited"`` (the request's rows that
      receive edits: the main row and other methods' branch rows, ``RequestContext.edit_rows``) or
      ``"own"`` (only this method's own branch rows, which receive the other methods' edits). Two
      methods that write only their own rows never meet on a row.
    - ``plan_layers()``: the decoder layers of those edits: the ``layers`` parameter when given, else
      every layer from ``first_plan_layer`` on (the mask and position ids hold for every layer). Two
      methods whose layers are disjoint in every model (``causalmm:layers=1`` and the imbalanced fix
      on its default layers 2..L-1) can be combined.
    - ``edits_plan()``: False when these parameters write nothing to the plan (zero strength).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    name: str
    # one line shown by `clearsight mitigations`
    summary: ClassVar[str] = ""
    # "plan" (single-pass attention edit), "branch" (logits-level), "input" (replaces the input image), or "baseline"
    kind: ClassVar[str] = "plan"
    # part of `clearsight demo`'s job (False only for methods too slow for it, with the reason in the docs)
    in_demo: ClassVar[bool] = True
    plan_fields: ClassVar[dict[str, str]] = {}
    refuses_plan_fields: ClassVar[dict[str, str]] = {}
    abs_bias_rows: ClassVar[str | None] = None
    plan_rows: ClassVar[str] = "edited"
    first_plan_layer: ClassVar[int] = 0

    def edits_plan(self) -> bool:
        """Whether these parameters write the plan fields declared above (False at zero strength)."""
        return True

    def leaves_forward_alone(self) -> bool:
        """No plan edit (``apply``) and no hook (``install``): each of its rows computes what the unmitigated model
        computes for that row's inputs, so an eval may line its requests up with other such systems' requests for
        the same sample, whose repeated rows then share one prefill (``decoding.batch``)."""
        return type(self).apply is Mitigation.apply and type(self).install is Mitigation.install

    def cannot_act_on(self, config: Mapping[str, Any]) -> str | None:
        """Why these parameters cannot act as designed on a model with this ``config.json`` (read without
        loading weights), for a report's verdict; None when nothing in the config says so."""
        return None

    def refuses(self, other: Mitigation) -> str | None:
        """Why this method cannot run in one request with ``other`` beyond the plan fields (e.g. CARVE's
        two-image re-query); None = no objection. ``registry.check_compatible`` asks both methods."""
        return None

    def plan_layers(self) -> frozenset[int] | int:
        """The layers of the plan edits: a set (the ``layers`` parameter), or an int s for "s and every layer
        after it" (the default range, which ends at the model's depth)."""
        layers = getattr(self, "layers", None)
        return frozenset(layers) if layers is not None else self.first_plan_layer

    def input_images(self, ctx: RequestContext) -> list[Image.Image] | None:
        """The images the request's main row sees instead of the request's image (CARVE's refined view, or
        [original, refined]); None = unchanged. Called before ``branches``, in the order the mitigations are
        given; afterwards ``ctx.image`` is the last of them (the image the branches' ``"same"`` refers to)."""
        return None

    def prepare(self, ctx: RequestContext) -> None:
        """Per-request work before the request's rows exist (after ``input_images``, before ``branches``): the
        place for probe generations, which the scheduler can batch across requests (``Probe``'s ``batched``).
        Keep results in ``ctx.state``; the context lives until the request ends."""

    def branches(self, ctx: RequestContext) -> list[Branch]:
        """Extra rows this request needs (their names must be unique within the mitigation)."""
        return []

    def apply(self, ctx: RequestContext) -> None:
        """Write plan edits for ``ctx.rows`` (called once per request, before prefill)."""

    def install(self, ctx: RequestContext) -> Any | None:
        """Install forward hooks (through ``ctx.lvlm.adapter.hook_*``) for this request's generation.

        Return an object with ``remove()`` (e.g. the adapter's HookHandles); the loop removes it when
        the generation ends, also on errors. Hooks see the whole batch: touch only ``ctx.rows``, and
        read ``ctx.step`` to know whether this is the prefill (0) or decode step t.
        """
        return None

    def combine(self, logits: dict[str, torch.Tensor], step: int, ctx: RequestContext) -> torch.Tensor | None:
        """Combine next-token logits ([V] per branch, ``"main"`` = current combined logits); None = no change."""
        return None

    def describe(self) -> str:
        params = self.model_dump(exclude={"name"})
        return self.name + (":" + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
