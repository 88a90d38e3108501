"""The AttentionPlan: the one contract between mitigations and attention backends.

A plan is built once per request batch (B rows, prompt length L0 after left padding) and read by
every attention call of the language model, at prefill and at every decode step. It holds only
small vectors (per key, per head, per row), never an L x L tensor, so that a fused kernel can read
it. Mitigations write it through the ``add_* / set_*`` methods, each naming the rows it owns, so
one plan serves a batch of unrelated requests: every row keeps its own edits.

Semantics, per layer l, row b, head h, query row i (key index q_i), key j (segment g_j):

1. ``s = scaling * q.k`` (float32).
2. ``s += bias[b, h, g_j]``                                   (constant key-class bias)
3. ``s += abs_bias[b, h, g_j] * |s_raw|`` where ``q_i >= abs_from[b]``   (PAI / PAINT: the raw score)
4. mask: key j allowed iff it is not padding and ``k_rank[b, j] <= q_limit[b, i]`` (causal by default),
   or ``q_lo2[b, i] <= k_rank[b, j] <= q_hi2[b, i]`` (a second interval of ranks per query, empty by
   default: lo2 = 0, hi2 = -1; AKI's modality-mutual mask, where image queries stay causal among the
   image and also see the question after it); in a sliding-window layer (the model passes ``sliding_window``)
   also ``j > q_i - window`` (``AttentionPlan.windowed``)
5. ``a = softmax(s)``
6. counterfactual (CausalMM branches): on image keys the distribution is replaced by a uniform,
   random, shuffled or reversed one, keeping the row's image mass (see ``counterfactual_weights``).
7. redistribute (VAR, Kang et al. 2025, Sec. 4): for query rows ``q_i >= rows_from[b]`` whose image
   mass ``M_img >= min_image_mass`` and non-sink image share ``M_ns / M_img >= rho``: sink keys keep
   ``1 - p``; the removed mass ``p * M_sink`` goes to non-sink image keys in proportion to their
   weight. Equivalent to adding ``log(1-p)`` / ``log(1 + p M_sink / M_ns)`` to the scores, so the
   row sum is preserved exactly.
8. ``out = a @ v``; ``out[b, h] *= head_scale[b, h]`` (VHR).

Generated keys (index >= L0) are TEXT and causal. ``position_ids`` overrides (CCA) do not reach the
kernel: the decoding loop feeds them to the model's own forward.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from clearsight.errors import InputError

# ranks and limits of generated tokens live above every prompt rank
GENERATED_RANK_OFFSET = 1 << 30
# counterfactual draws of all layers in one hash only while small (decode steps), in int64 elements
_BATCHED_DRAWS_MAX = 1 << 22


class Segment(enum.IntEnum):
    """Key classes. Values index the last dimension of ``bias`` / ``abs_bias``."""

    TEXT = 0
    IMAGE = 1
    IMAGE_SINK = 2
    TEXT_SINK = 3


NUM_SEGMENTS = len(Segment)
IMAGE_SEGMENTS = (Segment.IMAGE, Segment.IMAGE_SINK)


class QueryRows(enum.StrEnum):
    """Which query rows an edit touches, resolved per row to a key-index threshold."""

    ALL = "all"  # every row, prompt included
    LAST = "last"  # the last prompt row and every generated row (the row that predicts a token)
    GENERATED = "generated"  # generated rows only
    AFTER_IMAGE = "after_image"  # rows after the last image token (VAR at prefill)


class Counterfactual(enum.IntEnum):
    NONE = 0
    UNIFORM = 1
    RANDOM = 2
    SHUFFLED = 3
    REVERSED = 4


# the plan fields one mitigation owns per row (and per layer where it applies): a second writer is refused
EXCLUSIVE_FIELDS = ("segments", "redistribution", "counterfactual", "mask", "position ids")


class PlanConflictError(InputError):
    """Two mitigations wrote the same exclusive plan field for the same row.

    An ``InputError`` (the CLI prints it as one line, exit 2). ``parse_mitigations`` refuses such
    combinations before any model loads (``clearsight.mitigations.registry.check_compatible``); this
    error is the runtime safety net.
    """


@dataclass(frozen=True)
class RowLayout:
    """Where things are in one row, in key coordinates (left padding included)."""

    pad: int
    image_spans: tuple[tuple[int, int], ...] = ()  # [start, end) per image
    grids: tuple[tuple[int, int], ...] = ()  # (rows, cols) of each image's token grid

    @property
    def image_end(self) -> int:
        return max((e for _, e in self.image_spans), default=self.pad)


@dataclass
class Redistribute:
    p_move: torch.Tensor  # [B] fraction of sink mass moved (0 = row untouched)
    rho: torch.Tensor  # [B] minimum non-sink share of the image mass
    min_image_mass: torch.Tensor  # [B]
    rows_from: torch.Tensor  # [B] int64: query rows with key index >= this are candidates


@dataclass
class CounterfactualEdit:
    kind: torch.Tensor  # [B] int64, Counterfactual codes (NONE = row untouched)
    seed: torch.Tensor  # [B] int64
    source: torch.Tensor  # [B, L0] int64: key j takes the weight of key source[j] (SHUFFLED)


@dataclass
class LayerEdit:
    bias: torch.Tensor | None = None  # [B, H, S]
    abs_bias: torch.Tensor | None = None  # [B, H, S]
    abs_from: torch.Tensor | None = None  # [B] int64
    redistribute: Redistribute | None = None
    counterfactual: CounterfactualEdit | None = None
    head_scale: torch.Tensor | None = None  # [B, H]
    segment: torch.Tensor | None = None  # [B, L0] int8 override of the plan's segments
    # host-side facts kept up to date by the plan's writers, so backends never sync on tensors
    abs_rows_from: int | None = None  # smallest abs_from over rows with a non-zero abs_bias
    counterfactual_kinds: frozenset[int] = frozenset()  # the kinds some row uses, NONE included
    random_rows: tuple[int, ...] = ()  # the rows whose counterfactual kind is RANDOM (they alone need draws)

    @property
    def counterfactual_active(self) -> bool:
        """Some row has a counterfactual kind other than NONE."""
        return bool(self.counterfactual_kinds - {int(Counterfactual.NONE)})

    @property
    def edits_scores(self) -> bool:
        """Whether anything changes the probabilities (head_scale and segments alone do not)."""
        return (self.bias is not None or self.abs_rows_from is not None or self.redistribute is not None
                or self.counterfactual_active)


@dataclass
class StatsRequest:
    """What attention statistics to record instead of attention maps."""

    segment_mass: bool = False  # per (layer, row, head, query) mass on each segment
    last_row: bool = False  # the last query row's attention over all keys, per head
    layers: frozenset[int] | None = None  # None = every layer

    def wants(self, layer: int) -> bool:
        return (self.segment_mass or self.last_row) and (self.layers is None or layer in self.layers)


@dataclass
class PlanStats:
    """Recorded statistics: per layer, one entry per forward call (prefill, then each step)."""

    segment_mass: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # [B, H, Lq, S]
    last_row: dict[int, list[torch.Tensor]] = field(default_factory=dict)  # [B, H, Lk]


def hash_positions(head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The position part of ``uniform_hash``'s input (int64): the same for every layer of a forward."""
    return head * 0x85EBCA77 + q * 0xC2B2AE3D + k * 0x27D4EB2F


def hash_mix(seed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``uniform_hash`` from a seed and ``hash_positions`` (lowbias32 mix) -> float32 in (0, 1]."""
    m = 0xFFFFFFFF
    # in place on the one fresh tensor: at prefill it is B x H x Lq x Lk int64, and each temporary cost as much
    x = torch.add(positions, seed * 0x9E3779B1)
    x.bitwise_and_(m)
    x.bitwise_xor_(x >> 16)
    x.mul_(0x7FEB352D).bitwise_and_(m)
    x.bitwise_xor_(x >> 15)
    x.mul_(0x846CA68B).bitwise_and_(m)
    x.bitwise_xor_(x >> 16)
    return x.bitwise_right_shift_(8).add_(1).to(torch.float32).mul_(1.0 / (1 << 24))


def uniform_hash(seed: torch.Tensor, head: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Counter-based uniform numbers in (0, 1], identical in every backend (lowbias32 mix).

    Depends only on (seed, head, query position, key position), with positions counted from the row's
    first non-padding token, never on the batch row or its padding, so a branch draws the same numbers
    alone and inside a batch. Arguments broadcast; int64 in, float32 out.
    """
    return hash_mix(seed, hash_positions(head, q, k))


@dataclass
class CounterfactualGrid:
    """What the counterfactual of every layer shares within one forward (same queries, keys and image
    keys), built once per forward rather than once per layer: at decode the counterfactual's cost is
    the number of small ops, not their size."""

    image_keys: torch.Tensor  # [B, 1, Lq, Lk] bool: image keys the query may attend
    img: torch.Tensor  # the same as a float mask
    uniform: torch.Tensor  # [B, 1, Lq, Lk] the uniform distribution over those keys
    positions: torch.Tensor | None  # [B, H, Lq, Lk] int64 hash_positions (pad-relative), RANDOM only
    draws: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> uniform_hash draws [B, H, Lq, Lk]


@dataclass
class ForwardCache:
    """What the backends derive from a plan and reuse within a forward (and across forwards of the same shape).

    Kept apart from the plan's contract: every writer and row operation of the plan calls ``clear()``, so a
    cache never outlives the plan state it was derived from.
    """

    seg: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    mask: tuple[tuple[int, int], torch.Tensor] | None = None
    float_mask: tuple[tuple[int, int, torch.dtype, int | None], torch.Tensor] | None = None
    grid: dict[tuple, CounterfactualGrid] = field(default_factory=dict)
    q_index: tuple[tuple[int, int], torch.Tensor] | None = None

    def clear(self) -> None:
        self.seg.clear()
        self.mask = self.float_mask = self.q_index = None
        self.grid.clear()


def counterfactual_grid(image_keys: torch.Tensor, q_index: torch.Tensor, pad: torch.Tensor, num_heads: int,
                        dtype: torch.dtype, random: bool) -> CounterfactualGrid:
    B, _, Lq, Lk = image_keys.shape
    img = image_keys.to(dtype)
    uniform = img / img.sum(-1, keepdim=True).clamp_min(1.0)
    positions = None
    if random:
        heads = torch.arange(num_heads, device=img.device).view(1, num_heads, 1, 1)
        keys = torch.arange(Lk, device=img.device).view(1, 1, 1, Lk)
        rel = pad.view(B, 1, 1, 1)
        positions = hash_positions(heads, q_index.view(1, 1, Lq, 1) - rel, keys - rel)
    return CounterfactualGrid(image_keys, img, uniform, positions)


def counterfactual_weights(
    a: torch.Tensor,
    image_keys: torch.Tensor,
    kind: torch.Tensor,
    seed: torch.Tensor,
    source: torch.Tensor,
    q_index: torch.Tensor,
    pad: torch.Tensor,
    kinds: frozenset[int] | None = None,
    grid: CounterfactualGrid | None = None,
    draws: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace the distribution over image keys, keeping each row's image mass.

    a: [B, H, Lq, Lk] probabilities; image_keys: [B, 1, Lq, Lk] bool (image and allowed);
    kind, seed, pad: [B]; source: [B, Lk] (SHUFFLED gather index); q_index: [Lq] key index of each row;
    kinds: the kinds present (None = any), so only those distributions are built; grid: the
    per-forward invariants (``counterfactual_grid``), built here when not given; draws: the RANDOM
    kind's ``uniform_hash`` numbers for these seeds, computed here when not given.
    Rows whose kind is NONE come back unchanged; a shuffle or reversal with no weight left on the
    visible image keys (rows inside the image block) falls back to uniform. Counterfactual attention after CausalMM
    (Zhou et al. 2025, Sec. 3.3): uniform, random U(0,1), a shuffle, and "max - a" reversal.
    """
    B, H, Lq, Lk = a.shape
    present = kinds if kinds is not None else frozenset(int(c) for c in Counterfactual)
    if grid is None:
        grid = counterfactual_grid(image_keys, q_index, pad, H, a.dtype, Counterfactual.RANDOM in present)
    img, uniform = grid.img, grid.uniform
    mass = (a * img).sum(-1, keepdim=True)
    kind_ = kind.view(B, 1, 1, 1)
    single = len(present - {int(Counterfactual.NONE)}) == 1  # one kind: no per-row choice between kinds

    def choose(this: Counterfactual, d_this: torch.Tensor, d: torch.Tensor | None) -> torch.Tensor:
        return d_this if single else torch.where(kind_ == this, d_this, torch.zeros_like(a) if d is None else d)

    d = choose(Counterfactual.UNIFORM, uniform, None) if Counterfactual.UNIFORM in present or not single else None
    if Counterfactual.RANDOM in present:
        if draws is None:
            assert grid.positions is not None
            draws = hash_mix(seed.view(B, 1, 1, 1), grid.positions)
        u = draws * img
        d = choose(Counterfactual.RANDOM, u / u.sum(-1, keepdim=True).clamp_min(1e-30), d)
    if Counterfactual.SHUFFLED in present:
        src = source[:, :Lk].view(B, 1, 1, Lk).expand(B, H, Lq, Lk)
        shuffled = torch.gather(a, -1, src) * img
        shuf_sum = shuffled.sum(-1, keepdim=True)
        shuffled = torch.where(shuf_sum > 0, shuffled / shuf_sum.clamp_min(1e-30), uniform)
        d = choose(Counterfactual.SHUFFLED, shuffled, d)
    if Counterfactual.REVERSED in present:
        top = torch.where(image_keys, a, torch.zeros_like(a)).amax(-1, keepdim=True)
        rev = (top - a) * img
        rev_sum = rev.sum(-1, keepdim=True)
        reversed_ = torch.where(rev_sum > 0, rev / rev_sum.clamp_min(1e-30), uniform)
        d = choose(Counterfactual.REVERSED, reversed_, d)
    if d is None:  # only NONE rows
        return a
    replaced = torch.where(image_keys, mass * d, a)
    return torch.where(kind_ != Counterfactual.NONE, replaced, a) if Counterfactual.NONE in present else replaced


def redistribution_factors(masses: torch.Tensor, red: Redistribute, q_index: torch.Tensor) -> torch.Tensor:
    """Per-segment multipliers c_g for VAR.

    masses: [B, H, Lq, S] post-softmax segment masses; q_index: [Lq]. Returns c: [B, H, Lq, S]
    (1 where the row is not edited).
    """
    B = masses.shape[0]
    m_img = masses[..., Segment.IMAGE] + masses[..., Segment.IMAGE_SINK]
    m_ns = masses[..., Segment.IMAGE]
    m_sink = masses[..., Segment.IMAGE_SINK] + masses[..., Segment.TEXT_SINK]
    p = red.p_move.view(B, 1, 1).to(masses.dtype)
    rows = q_index.view(1, 1, -1) >= red.rows_from.view(B, 1, 1)
    head_ok = (m_img >= red.min_image_mass.view(B, 1, 1)) & (m_ns >= red.rho.view(B, 1, 1) * m_img)
    applied = rows & head_ok & (m_ns > 0) & (p > 0)
    c = torch.ones_like(masses)
    c[..., Segment.IMAGE_SINK] = 1.0 - p
    c[..., Segment.TEXT_SINK] = 1.0 - p
    c[..., Segment.IMAGE] = 1.0 + p * m_sink / m_ns.clamp_min(1e-30)
    return torch.where(applied.unsqueeze(-1), c, torch.ones_like(c))


def _as_rows(rows: list[int] | range | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(list(rows) if not isinstance(rows, torch.Tensor) else rows, dtype=torch.long)


class AttentionPlan:
    """Edits for one batch of rows. See the module docstring for the exact semantics."""

    def __init__(
        self,
        *,
        num_layers: int,
        num_heads: int,
        segment: torch.Tensor,
        layouts: list[RowLayout],
    ) -> None:
        if segment.ndim != 2 or segment.shape[0] != len(layouts):
            raise ValueError(f"segment must be [B, L0] with B = {len(layouts)} layouts, got {tuple(segment.shape)}")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.segment = segment.to(torch.int8)
        self.layouts = list(layouts)
        self.device = segment.device
        self.layers: dict[int, LayerEdit] = {}
        self.k_rank: torch.Tensor | None = None  # [B, L0] int64
        self.q_limit: torch.Tensor | None = None  # [B, L0] int64
        # second allowed interval of key ranks per query, [B, L0] int64 each (set with k_rank: empty = 0, -1)
        self.q_lo2: torch.Tensor | None = None
        self.q_hi2: torch.Tensor | None = None
        self.position_ids: torch.Tensor | None = None  # [B, L0] int64 (fed to the model, not the kernel)
        self.stats = StatsRequest()
        self.stats_out = PlanStats()
        self.capture_layer: int | None = None  # reference backend only: keep one layer's full maps
        self.captured: list[torch.Tensor] = []
        self._owners: dict[tuple[str, int, int], str] = {}
        self.cache = ForwardCache()  # the backends' per-forward caches, never part of the contract
        self.pad = torch.tensor([lay.pad for lay in layouts], dtype=torch.long, device=self.device)

    # ----------------------------------------------------------------------------- shape facts
    @property
    def batch(self) -> int:
        return self.segment.shape[0]

    @property
    def prompt_len(self) -> int:
        return self.segment.shape[1]

    def rows_from(self, which: QueryRows | str) -> torch.Tensor:
        """Key-index threshold per row for a query-row selection."""
        which = QueryRows(which)
        L0 = self.prompt_len
        if which is QueryRows.ALL:
            vals = [0] * self.batch
        elif which is QueryRows.LAST:
            vals = [L0 - 1] * self.batch
        elif which is QueryRows.GENERATED:
            vals = [L0] * self.batch
        else:
            vals = [lay.image_end for lay in self.layouts]
        return torch.tensor(vals, dtype=torch.long, device=self.device)

    @property
    def has_custom_mask(self) -> bool:
        return self.k_rank is not None

    # ----------------------------------------------------------------------------- writing
    def _claim(self, what: str, layer: int, rows: torch.Tensor, owner: str) -> None:
        assert what in EXCLUSIVE_FIELDS, what
        for r in rows.tolist():
            key = (what, layer, r)
            prev = self._owners.get(key)
            if prev is not None and prev != owner:
                where = f"layer {layer}, " if layer >= 0 else ""
                raise PlanConflictError(
                    f"'{owner}' and '{prev}' both set the attention {what} ({where}row {r}); "
                    "they cannot be combined in one request: drop one of them"
                )
            self._owners[key] = owner

    def owner(self, what: str, layer: int, row: int) -> str | None:
        """The mitigation that claimed an exclusive field of one row (``"segments"``, ``"counterfactual"``,
        ``"redistribution"``: per layer; ``"mask"``, ``"position ids"``: layer -1), or None."""
        return self._owners.get((what, layer, row))

    def edit(self, layer: int) -> LayerEdit:
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range: the language model has {self.num_layers} layers")
        return self.layers.setdefault(layer, LayerEdit())

    def layer_edit(self, layer: int) -> LayerEdit | None:
        return self.layers.get(layer)

    def _zeros_bhs(self) -> torch.Tensor:
        return torch.zeros(self.batch, self.num_heads, NUM_SEGMENTS, device=self.device)

    @staticmethod
    def _head_values(value: float | torch.Tensor, n_rows: int, num_heads: int) -> torch.Tensor:
        v = torch.as_tensor(value, dtype=torch.float32)
        if v.ndim == 0:
            v = v.expand(num_heads)
        if v.ndim == 1:
            v = v.unsqueeze(0).expand(n_rows, -1)
        if v.shape != (n_rows, num_heads):
            raise ValueError(f"per-head values must be a scalar, [H] or [rows, H]; got {tuple(v.shape)}")
        return v

    def add_bias(self, layers, rows, segment: Segment, value: float | torch.Tensor) -> None:
        """Constant additive bias on keys of ``segment`` (adds up with other mitigations)."""
        r = _as_rows(rows)
        vals = self._head_values(value, len(r), self.num_heads).to(self.device)
        for layer in layers:
            e = self.edit(layer)
            if e.bias is None:
                e.bias = self._zeros_bhs()
            e.bias[r, :, int(segment)] += vals

    def add_abs_bias(
        self, layers, rows, segment: Segment, value: float | torch.Tensor, query_rows: QueryRows | str, owner: str
    ) -> None:
        """Score-dependent bias ``s += value * |s|`` on keys of ``segment`` for the selected query rows."""
        r = _as_rows(rows)
        vals = self._head_values(value, len(r), self.num_heads).to(self.device)
        thresh = self.rows_from(query_rows)[r]
        for layer in layers:
            e = self.edit(layer)
            if e.abs_bias is None:
                e.abs_bias = self._zeros_bhs()
                e.abs_from = torch.zeros(self.batch, dtype=torch.long, device=self.device)
            assert e.abs_from is not None
            # several boosts may share a row (PAI + PAINT) only if they agree on the rows they edit
            touched = e.abs_bias[r].abs().sum((1, 2)) > 0
            clash = touched & (e.abs_from[r] != thresh)
            if bool(clash.any()):
                raise PlanConflictError(
                    f"'{owner}' selects different query rows than an earlier abs-bias edit on layer {layer}"
                )
            e.abs_bias[r, :, int(segment)] += vals
            e.abs_from[r] = thresh
            if bool((vals != 0).any()):
                low = int(thresh.min())
                e.abs_rows_from = low if e.abs_rows_from is None else min(e.abs_rows_from, low)

    def set_redistribute(
        self,
        layers,
        rows,
        *,
        p_move: float,
        rho: float,
        min_image_mass: float,
        query_rows: QueryRows | str,
        owner: str,
    ) -> None:
        if not 0.0 <= p_move <= 1.0:
            raise ValueError(f"p_move must be in [0, 1], got {p_move}")
        r = _as_rows(rows)
        thresh = self.rows_from(query_rows)[r]
        for layer in layers:
            self._claim("redistribution", layer, r, owner)
            e = self.edit(layer)
            if e.redistribute is None:
                z = torch.zeros(self.batch, device=self.device)
                e.redistribute = Redistribute(
                    p_move=z.clone(), rho=z.clone(), min_image_mass=z.clone(),
                    rows_from=torch.zeros(self.batch, dtype=torch.long, device=self.device),
                )
            e.redistribute.p_move[r] = p_move
            e.redistribute.rho[r] = rho
            e.redistribute.min_image_mass[r] = min_image_mass
            e.redistribute.rows_from[r] = thresh

    def set_counterfactual(self, layers, rows, kind: Counterfactual | str, seed: int, owner: str) -> None:
        kind = Counterfactual[kind.upper()] if isinstance(kind, str) else Counterfactual(kind)
        r = _as_rows(rows)
        for layer in layers:
            self._claim("counterfactual", layer, r, owner)
            e = self.edit(layer)
            if e.counterfactual is None:
                L0 = self.prompt_len
                e.counterfactual = CounterfactualEdit(
                    kind=torch.zeros(self.batch, dtype=torch.long, device=self.device),
                    seed=torch.zeros(self.batch, dtype=torch.long, device=self.device),
                    source=torch.arange(L0, device=self.device).repeat(self.batch, 1),
                )
            cf = e.counterfactual
            cf.kind[r] = int(kind)
            cf.seed[r] = seed
            if kind is Counterfactual.SHUFFLED:
                for row in r.tolist():
                    cf.source[row] = self._shuffle_source(row, seed, layer)
            # every row's kind, NONE included (host-side, so backends can skip what no row uses)
            _counterfactual_facts(e)
        self.cache.grid.clear()  # cached draws follow the seeds

    def _shuffle_source(self, row: int, seed: int, layer: int) -> torch.Tensor:
        """A seeded permutation of this row's image keys (identity elsewhere), independent of padding."""
        src = torch.arange(self.prompt_len, device=self.device)
        pad = self.layouts[row].pad
        for start, end in self.layouts[row].image_spans:
            idx = torch.arange(start, end, device=self.device)
            keys = uniform_hash(torch.tensor(seed), torch.tensor(layer), torch.tensor(-1), idx - pad)
            src[start:end] = idx[torch.argsort(keys)]
        return src

    def scale_heads(self, layer: int, rows, scale: float | torch.Tensor) -> None:
        """Multiply per-head outputs (before o_proj); composes multiplicatively."""
        r = _as_rows(rows)
        vals = self._head_values(scale, len(r), self.num_heads).to(self.device)
        e = self.edit(layer)
        if e.head_scale is None:
            e.head_scale = torch.ones(self.batch, self.num_heads, device=self.device)
        e.head_scale[r] *= vals

    def set_segments(self, layer: int, rows, segment: torch.Tensor, owner: str) -> None:
        """Override the key segments of ``rows`` for one layer (VAR's per-layer sinks)."""
        r = _as_rows(rows)
        self._claim("segments", layer, r, owner)
        e = self.edit(layer)
        if e.segment is None:
            e.segment = self.segment.clone()
        e.segment[r] = segment.to(device=self.device, dtype=torch.int8)
        self.cache.clear()

    def set_mask(self, rows, k_rank: torch.Tensor, q_limit: torch.Tensor, owner: str,
                 q_lo2: torch.Tensor | None = None, q_hi2: torch.Tensor | None = None) -> None:
        """Custom prompt mask: key j visible to query i iff k_rank[j] <= q_limit[i], or
        q_lo2[i] <= k_rank[j] <= q_hi2[i] when the second interval is given (plus padding)."""
        r = _as_rows(rows)
        self._claim("mask", -1, r, owner)
        if self.k_rank is None:
            self.k_rank, self.q_limit, self.q_lo2, self.q_hi2 = self._mask_tables()
        assert self.q_limit is not None and self.q_lo2 is not None and self.q_hi2 is not None
        if q_lo2 is None or q_hi2 is None:
            if q_lo2 is not None or q_hi2 is not None:
                raise ValueError("set_mask: give both q_lo2 and q_hi2, or neither")
            q_lo2, q_hi2 = torch.zeros_like(q_limit), torch.full_like(q_limit, -1)
        if max(int(t.max()) for t in (k_rank, q_limit, q_hi2)) >= GENERATED_RANK_OFFSET:
            raise ValueError("prompt ranks and limits must stay below GENERATED_RANK_OFFSET")
        # copy on write: a new tensor per change, so caches keyed by the tensor's identity stay valid
        self.k_rank, self.q_limit = self.k_rank.clone(), self.q_limit.clone()
        self.q_lo2, self.q_hi2 = self.q_lo2.clone(), self.q_hi2.clone()
        self.k_rank[r] = k_rank.to(self.device, torch.long)
        self.q_limit[r] = q_limit.to(self.device, torch.long)
        self.q_lo2[r] = q_lo2.to(self.device, torch.long)
        self.q_hi2[r] = q_hi2.to(self.device, torch.long)
        self.cache.clear()

    def _mask_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k_rank, q_limit, q_lo2, q_hi2) of the plain causal mask: ranks = limits = positions, no second interval."""
        pos = torch.arange(self.prompt_len, device=self.device).repeat(self.batch, 1)
        return pos, pos.clone(), torch.zeros_like(pos), torch.full_like(pos, -1)

    def set_position_ids(self, rows, position_ids: torch.Tensor, owner: str) -> None:
        r = _as_rows(rows)
        self._claim("position ids", -1, r, owner)
        if self.position_ids is None:
            self.position_ids = default_position_ids(self.pad, self.prompt_len)
        self.position_ids[r] = position_ids.to(self.device, torch.long)

    def select_rows(self, keep: list[int]) -> None:
        """Keep only these rows (in this order), e.g. when finished requests leave the batch mid-generation."""
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)
        old_to_new = {old: new for new, old in enumerate(keep)}

        def sel(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.index_select(0, idx)

        self.segment = sel(self.segment)
        self.layouts = [self.layouts[i] for i in keep]
        self.pad = sel(self.pad)
        self.k_rank, self.q_limit, self.position_ids = sel(self.k_rank), sel(self.q_limit), sel(self.position_ids)
        self.q_lo2, self.q_hi2 = sel(self.q_lo2), sel(self.q_hi2)
        for e in self.layers.values():
            e.bias, e.abs_bias, e.abs_from = sel(e.bias), sel(e.abs_bias), sel(e.abs_from)
            e.head_scale, e.segment = sel(e.head_scale), sel(e.segment)
            if e.redistribute is not None:
                r = e.redistribute
                e.redistribute = Redistribute(sel(r.p_move), sel(r.rho), sel(r.min_image_mass), sel(r.rows_from))
            if e.counterfactual is not None:
                c = e.counterfactual
                e.counterfactual = CounterfactualEdit(sel(c.kind), sel(c.seed), sel(c.source))
            _host_facts(e)
        self._owners = {(w, l, old_to_new[r]): o for (w, l, r), o in self._owners.items() if r in old_to_new}
        self.cache.clear()

    # ----------------------------------------------------------------------------- row operations (joining)
    def extend_prompt(self, num_keys: int) -> None:
        """Treat the first ``num_keys`` keys as the plan's prompt: the generated keys among them become
        prompt columns holding exactly what the plan gave generated keys (TEXT, generated ranks, identity
        shuffle source). Nothing a query sees changes; the batch can then be left-padded and joined."""
        L0 = self.prompt_len
        n = num_keys - L0
        if n < 0:
            raise ValueError(f"extend_prompt: {num_keys} keys is shorter than the prompt ({L0})")
        if n == 0:
            return
        B, dev = self.batch, self.device
        idx = torch.arange(L0, num_keys, device=dev).repeat(B, 1)

        def text(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_full((B, n), int(Segment.TEXT))], 1)

        self.segment = text(self.segment)
        if self.k_rank is not None and self.q_limit is not None:
            self.k_rank = torch.cat([self.k_rank, idx + GENERATED_RANK_OFFSET], 1)
            self.q_limit = torch.cat([self.q_limit, idx + GENERATED_RANK_OFFSET], 1)
        if self.q_lo2 is not None and self.q_hi2 is not None:  # generated queries: no second interval
            self.q_lo2 = torch.cat([self.q_lo2, torch.zeros_like(idx)], 1)
            self.q_hi2 = torch.cat([self.q_hi2, torch.full_like(idx, -1)], 1)
        if self.position_ids is not None:
            last = self.position_ids[:, -1:]
            self.position_ids = torch.cat([self.position_ids, last + torch.arange(1, n + 1, device=dev)], 1)
        for e in self.layers.values():
            if e.segment is not None:
                e.segment = text(e.segment)
            if e.counterfactual is not None:
                c = e.counterfactual
                c.source = torch.cat([c.source, idx], 1)
        self.cache.clear()

    def pad_left(self, n: int) -> None:
        """Prepend ``n`` padding keys to every row (key index j becomes j + n); padding is masked by ``pad``."""
        if n < 0:
            raise ValueError(f"pad_left: n must be >= 0, got {n}")
        if n == 0:
            return
        B, dev = self.batch, self.device

        def cols(t: torch.Tensor, fill: int = 0) -> torch.Tensor:
            return torch.cat([t.new_full((B, n), fill), t], 1)

        self.segment = cols(self.segment, int(Segment.TEXT))
        if self.k_rank is not None and self.q_limit is not None:
            self.k_rank, self.q_limit = cols(self.k_rank), cols(self.q_limit)
        if self.q_lo2 is not None and self.q_hi2 is not None:
            self.q_lo2, self.q_hi2 = cols(self.q_lo2), cols(self.q_hi2, -1)
        if self.position_ids is not None:
            self.position_ids = cols(self.position_ids, 1)
        for e in self.layers.values():
            if e.segment is not None:
                e.segment = cols(e.segment, int(Segment.TEXT))
            if e.abs_from is not None:
                e.abs_from = e.abs_from + n
            if e.redistribute is not None:
                e.redistribute.rows_from = e.redistribute.rows_from + n
            if e.counterfactual is not None:
                c = e.counterfactual
                c.source = torch.cat([torch.arange(n, device=dev).repeat(B, 1), c.source + n], 1)
            _host_facts(e)
        self.layouts = [_shift_layout(lay, n) for lay in self.layouts]
        self.pad = self.pad + n
        self.cache.clear()

    def trim_left(self, n: int) -> None:
        """Drop the first ``n`` keys, padding in every row (compaction after rows left the batch)."""
        if n == 0:
            return
        if not 0 < n <= min(lay.pad for lay in self.layouts):
            raise ValueError(f"trim_left: only leading padding can be dropped (n={n}, pads "
                             f"{[lay.pad for lay in self.layouts]})")
        self.segment = self.segment[:, n:]
        if self.k_rank is not None and self.q_limit is not None:
            self.k_rank, self.q_limit = self.k_rank[:, n:], self.q_limit[:, n:]
        if self.q_lo2 is not None and self.q_hi2 is not None:
            self.q_lo2, self.q_hi2 = self.q_lo2[:, n:], self.q_hi2[:, n:]
        if self.position_ids is not None:
            self.position_ids = self.position_ids[:, n:]
        for e in self.layers.values():
            if e.segment is not None:
                e.segment = e.segment[:, n:]
            if e.abs_from is not None:
                e.abs_from = (e.abs_from - n).clamp_min(0)
            if e.redistribute is not None:
                e.redistribute.rows_from = (e.redistribute.rows_from - n).clamp_min(0)
            if e.counterfactual is not None:
                e.counterfactual.source = e.counterfactual.source[:, n:] - n
            _host_facts(e)
        self.layouts = [_shift_layout(lay, -n) for lay in self.layouts]
        self.pad = self.pad - n
        self.cache.clear()

    @classmethod
    def concatenate(cls, a: AttentionPlan, b: AttentionPlan) -> AttentionPlan:
        """The rows of ``a`` then the rows of ``b`` in one plan (their keys aligned: same ``prompt_len``, see
        ``extend_prompt`` / ``pad_left``). Each row keeps its own edits; a field only one side wrote gets
        its neutral value on the other side's rows (zero bias, unit head scale, no redistribution, no
        counterfactual, the plan's own segments). Statistics requests must agree."""
        if (a.num_layers, a.num_heads, a.prompt_len) != (b.num_layers, b.num_heads, b.prompt_len):
            shape_a, shape_b = (a.num_layers, a.num_heads, a.prompt_len), (b.num_layers, b.num_heads, b.prompt_len)
            raise ValueError(f"concatenate: plans differ in (layers, heads, keys): {shape_a} vs {shape_b}")
        if a.stats != b.stats:
            raise ValueError("concatenate: the plans record different statistics")
        out = cls(num_layers=a.num_layers, num_heads=a.num_heads, segment=torch.cat([a.segment, b.segment]),
                  layouts=[*a.layouts, *b.layouts])
        out.stats = a.stats
        if a.k_rank is not None or b.k_rank is not None:
            ta, tb = a._rank_tables(), b._rank_tables()
            out.k_rank, out.q_limit, out.q_lo2, out.q_hi2 = (torch.cat([x, y]) for x, y in zip(ta, tb))
        if a.position_ids is not None or b.position_ids is not None:
            out.position_ids = torch.cat([a._positions(), b._positions()])
        for layer in sorted(set(a.layers) | set(b.layers)):
            ea, eb = a.layers.get(layer, LayerEdit()), b.layers.get(layer, LayerEdit())
            e = out.edit(layer)

            def both(va: torch.Tensor | None, vb: torch.Tensor | None, neutral) -> torch.Tensor | None:
                if va is None and vb is None:
                    return None
                return torch.cat([va if va is not None else neutral(a), vb if vb is not None else neutral(b)])

            e.bias = both(ea.bias, eb.bias, lambda p: p._zeros_bhs())
            e.abs_bias = both(ea.abs_bias, eb.abs_bias, lambda p: p._zeros_bhs())
            e.abs_from = both(ea.abs_from, eb.abs_from, lambda p: p.pad.new_zeros(p.batch))
            e.head_scale = both(ea.head_scale, eb.head_scale,
                                lambda p: torch.ones(p.batch, p.num_heads, device=p.device))
            e.segment = both(ea.segment, eb.segment, lambda p: p.segment)
            if ea.redistribute is not None or eb.redistribute is not None:
                ra, rb = a._redistribution(ea), b._redistribution(eb)
                e.redistribute = Redistribute(*(torch.cat([x, y]) for x, y in
                                                zip((ra.p_move, ra.rho, ra.min_image_mass, ra.rows_from),
                                                    (rb.p_move, rb.rho, rb.min_image_mass, rb.rows_from))))
            if ea.counterfactual is not None or eb.counterfactual is not None:
                ca, cb = a._counterfactual(ea), b._counterfactual(eb)
                e.counterfactual = CounterfactualEdit(torch.cat([ca.kind, cb.kind]), torch.cat([ca.seed, cb.seed]),
                                                      torch.cat([ca.source, cb.source]))
            _host_facts(e)
        out._owners = {**a._owners, **{(w, l, r + a.batch): o for (w, l, r), o in b._owners.items()}}
        return out

    def _rank_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.k_rank is not None:
            assert self.q_limit is not None and self.q_lo2 is not None and self.q_hi2 is not None
            return self.k_rank, self.q_limit, self.q_lo2, self.q_hi2
        return self._mask_tables()

    def _positions(self) -> torch.Tensor:
        return self.position_ids if self.position_ids is not None else default_position_ids(self.pad, self.prompt_len)

    def _redistribution(self, e: LayerEdit) -> Redistribute:
        if e.redistribute is not None:
            return e.redistribute
        z = torch.zeros(self.batch, device=self.device)
        return Redistribute(z, z, z, self.pad.new_zeros(self.batch))

    def _counterfactual(self, e: LayerEdit) -> CounterfactualEdit:
        if e.counterfactual is not None:
            return e.counterfactual
        z = self.pad.new_zeros(self.batch)
        return CounterfactualEdit(z, z, torch.arange(self.prompt_len, device=self.device).repeat(self.batch, 1))

    # ----------------------------------------------------------------------------- reading (backends)
    def segments(self, layer: int, num_keys: int) -> torch.Tensor:
        """Key segments [B, Lk] (int64) for this layer; generated keys are TEXT."""
        key = (layer if (e := self.layers.get(layer)) is not None and e.segment is not None else -1, num_keys)
        hit = self.cache.seg.get(key)
        if hit is not None:
            return hit
        base = self.segment if key[0] < 0 else self.layers[layer].segment
        assert base is not None
        seg = base.long()
        if num_keys > seg.shape[1]:
            extra = torch.full((self.batch, num_keys - seg.shape[1]), int(Segment.TEXT), device=self.device)
            seg = torch.cat([seg, extra], 1)
        seg = seg[:, :num_keys]
        if len(self.cache.seg) > 64:
            self.cache.seg.clear()
        self.cache.seg[key] = seg
        return seg

    def _ranks(self, values: torch.Tensor | None, n: int) -> torch.Tensor:
        """Extend prompt ranks/limits to n keys: generated tokens rank above every prompt token."""
        L0 = self.prompt_len
        base = values if values is not None else torch.arange(L0, device=self.device).repeat(self.batch, 1)
        if n <= L0:
            return base[:, :n]
        gen = torch.arange(L0, n, device=self.device) + GENERATED_RANK_OFFSET
        return torch.cat([base, gen.repeat(self.batch, 1)], 1)

    def _second(self, values: torch.Tensor, n: int) -> torch.Tensor:
        """Extend q_lo2 / q_hi2 to n keys: generated queries have no second interval (lo 0, hi -1)."""
        L0 = self.prompt_len
        if n <= L0:
            return values[:, :n]
        fill = 0 if values is self.q_lo2 else -1
        return torch.cat([values, values.new_full((self.batch, n - L0), fill)], 1)

    def allowed(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """Which keys each query may attend: [B, 1, Lq, Lk] bool (padding, causality, custom mask).

        Padding query rows attend to themselves only, so no softmax row is empty (their outputs
        are never read).
        """
        key = (num_queries, num_keys)
        if self.cache.mask is not None and self.cache.mask[0] == key:
            return self.cache.mask[1]
        q_index = self.query_index(num_queries, num_keys)
        kv = torch.arange(num_keys, device=self.device)
        if self.only_generated_queries(num_queries, num_keys):
            # decode: a generated token sees every non-padding key up to itself, whatever the prompt mask
            # (generated ranks exceed every prompt rank); the short form matters, it runs every step
            allowed = (kv.view(1, 1, -1) >= self.pad.view(-1, 1, 1)) & (kv.view(1, 1, -1) <= q_index.view(1, -1, 1))
            self.cache.mask = (key, allowed.unsqueeze(1))
            return self.cache.mask[1]
        rank = self._ranks(self.k_rank, num_keys)  # [B, Lk]
        limit = self._ranks(self.q_limit, num_keys)[:, num_keys - num_queries :]  # [B, Lq]
        valid_k = kv.view(1, -1) >= self.pad.view(-1, 1)  # [B, Lk]
        allowed = rank.unsqueeze(1) <= limit.unsqueeze(2)
        if self.q_lo2 is not None and self.q_hi2 is not None:
            lo2, hi2 = (self._second(t, num_keys)[:, num_keys - num_queries:] for t in (self.q_lo2, self.q_hi2))
            allowed = allowed | ((rank.unsqueeze(1) >= lo2.unsqueeze(2)) & (rank.unsqueeze(1) <= hi2.unsqueeze(2)))
        allowed = allowed & valid_k.unsqueeze(1)
        pad_q = q_index.view(1, -1) < self.pad.view(-1, 1)  # [B, Lq]
        self_key = q_index.view(1, -1, 1) == kv.view(1, 1, -1)
        allowed = torch.where(pad_q.unsqueeze(2), self_key, allowed).unsqueeze(1)
        self.cache.mask = (key, allowed)
        return allowed

    def counterfactual_grid(self, layer: int, allowed: torch.Tensor, q_index: torch.Tensor, dtype: torch.dtype,
                            random: bool, window: int | None = None) -> CounterfactualGrid:
        """``counterfactual_grid`` for this layer's image keys and these query rows (``allowed`` [B, 1, Lq, Lk]
        is ``self.allowed`` for them, with this layer's sliding ``window``), cached for the forward: layers with the
        plan's segments and the same window share one."""
        Lq, Lk = allowed.shape[2], allowed.shape[3]
        seg_key = layer if (e := self.layers.get(layer)) is not None and e.segment is not None else -1
        key = (seg_key, Lq, Lk, dtype, random, window)
        hit = self.cache.grid.get(key)
        if hit is not None:
            return hit
        if any(k[1:3] != (Lq, Lk) for k in self.cache.grid):  # a new forward: the old grids are done
            self.cache.grid.clear()
        seg = self.segments(layer, Lk)
        image = (seg == IMAGE_SEGMENTS[0]) | (seg == IMAGE_SEGMENTS[1])
        grid = counterfactual_grid(image.view(self.batch, 1, 1, Lk) & allowed, q_index, self.pad, self.num_heads,
                                   dtype, random)
        self.cache.grid[key] = grid
        return grid

    def counterfactual_draws(self, layer: int, grid: CounterfactualGrid) -> torch.Tensor:
        """The RANDOM counterfactual's numbers for this layer's seeds. When they are small (decode steps), the
        first layer to ask draws them for every RANDOM layer at once (one batched hash instead of one per layer)."""
        hit = grid.draws.get(layer)
        if hit is not None:
            return hit
        assert grid.positions is not None
        layers = [i for i, e in sorted(self.layers.items())
                  if e.counterfactual is not None and Counterfactual.RANDOM in e.counterfactual_kinds]
        if layer not in layers or len(layers) * grid.positions.numel() > _BATCHED_DRAWS_MAX:
            layers = [layer]  # prefill: one layer at a time (all layers at once would be nL x B x H x L x L)
        seeds = torch.stack([self.layers[i].counterfactual.seed for i in layers])  # type: ignore[union-attr]
        rows = self.layers[layer].random_rows
        if len(layers) == 1 and len(rows) < self.batch:
            # only the RANDOM rows read their draws (counterfactual_weights keeps the other rows' own
            # probabilities or another kind's); the rest get 1, a valid draw, so nothing downstream sees a 0 / 0
            idx = torch.tensor(rows, device=seeds.device, dtype=torch.long)
            draws = torch.ones(grid.positions.shape, dtype=torch.float32, device=seeds.device)
            draws[idx] = hash_mix(seeds[0, idx].view(-1, 1, 1, 1), grid.positions[idx])
            grid.draws[layer] = draws
            return draws
        draws = hash_mix(seeds.view(len(layers), self.batch, 1, 1, 1), grid.positions.unsqueeze(0))
        grid.draws.update(zip(layers, draws.unbind(0)))
        return grid.draws[layer]

    def windowed(self, allowed: torch.Tensor, window: int | None) -> torch.Tensor:
        """``allowed`` [B, 1, Lq, Lk] of the last Lq queries, narrowed to a sliding window: key j stays visible to
        query i only if ``j > i - window`` (transformers' ``sliding_window_overlay``, on key indices: every layer
        keeps every key, see ``decoding.batch``). None = no window (a global layer)."""
        if window is None:
            return allowed
        Lq, Lk = allowed.shape[2], allowed.shape[3]
        q_index = self.query_index(Lq, Lk)
        kv = torch.arange(Lk, device=allowed.device)
        return allowed & (kv.view(1, -1) > q_index.view(-1, 1) - window).view(1, 1, Lq, Lk)

    def query_index(self, num_queries: int, num_keys: int) -> torch.Tensor:
        """Key index of each query row, [Lq] int64 (cached with the mask: one per forward)."""
        key = (num_queries, num_keys)
        if self.cache.q_index is None or self.cache.q_index[0] != key:
            self.cache.q_index = (key, torch.arange(num_keys - num_queries, num_keys, device=self.device))
        return self.cache.q_index[1]

    def float_mask(self, num_queries: int, num_keys: int, dtype: torch.dtype, window: int | None = None
                   ) -> torch.Tensor:
        """``allowed`` (narrowed to ``window``) as an additive mask (0 / -inf), [B, 1, Lq, Lk]; shared by every
        layer of a forward with the same window."""
        key = (num_queries, num_keys, dtype, window)
        if self.cache.float_mask is not None and self.cache.float_mask[0] == key:
            return self.cache.float_mask[1]
        allowed = self.windowed(self.allowed(num_queries, num_keys), window)
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(~allowed, float("-inf"))
        self.cache.float_mask = (key, mask)
        return mask

    def only_generated_queries(self, num_queries: int, num_keys: int) -> bool:
        """True at decode: every query is a generated token, which sees every non-padding key before it,
        whatever the custom prompt mask says (generated tokens rank above every prompt rank)."""
        return num_keys - num_queries >= self.prompt_len


def _host_facts(e: LayerEdit) -> None:
    """Recompute a layer edit's host-side facts from its tensors (after a row operation)."""
    if e.counterfactual is not None:
        _counterfactual_facts(e)
    if e.abs_bias is not None and e.abs_from is not None:
        active = e.abs_bias.abs().sum((1, 2)) > 0
        e.abs_rows_from = int(e.abs_from[active].min()) if bool(active.any()) else None


def _counterfactual_facts(e: LayerEdit) -> None:
    assert e.counterfactual is not None
    kinds = e.counterfactual.kind.tolist()
    e.counterfactual_kinds = frozenset(int(k) for k in kinds)
    e.random_rows = tuple(i for i, k in enumerate(kinds) if k == Counterfactual.RANDOM)


def _shift_layout(lay: RowLayout, n: int) -> RowLayout:
    return RowLayout(pad=lay.pad + n, image_spans=tuple((s + n, e + n) for s, e in lay.image_spans), grids=lay.grids)


def default_position_ids(pad: torch.Tensor, length: int) -> torch.Tensor:
    """Positions 0.. after each row's left padding (padding gets 1, as transformers' generate does)."""
    pos = torch.arange(length, device=pad.device).view(1, -1) - pad.view(-1, 1)
    return pos.masked_fill(pos < 0, 1)


def segment_one_hot(seg: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, Lk] segments -> [B, Lk, S] one-hot."""
    return torch.nn.functional.one_hot(seg.long(), NUM_SEGMENTS).to(dtype)


def gather_key_values(per_segment: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """[B, H, S] per-segment values -> [B, H, 1, Lk] per-key values."""
    B, H, _ = per_segment.shape
    idx = seg.long().unsqueeze(1).expand(B, H, seg.shape[1])
    return torch.gather(per_segment, 2, idx).unsqueeze(2)
