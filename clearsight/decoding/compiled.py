"""The compiled decode step: a preallocated (static) KV cache and one ``torch.compile``d forward per step.

Opt-in (``generate(..., compile=True)``, ``Engine(..., compile=True)``); the eager step stays the default.
A batch runs it when every request in it asked for it and nothing in it needs Python between the layers:

- after the batch's prefill (eager, as always) its DynamicCache is copied into a ``StaticCache`` whose
  length is the keys so far plus the most tokens any row may still add, rounded up to ``CAPACITY_ROUND``
  (so batches of similar lengths share one graph), and the attention mask becomes a buffer of that length;
  a step writes its key column in place, so every step has the same shapes and the graph is reused. On a
  GPU the step is compiled with ``mode="reduce-overhead"`` (CUDA graphs); on a CPU with the default mode;
- the plan is bound with ``kernels.context.use_traced`` (dynamo cannot trace the ContextVar that eager
  forwards read). A plan with no edit and no statistics at decode (an empty plan; prompt-only edits such as
  CCA's and MMA's masks) is bound as ``None``: stock attention over the model's mask, one graph for every
  such batch. A plan whose decode edits are per-head output scales is traced into the graph (its scales are
  fixed-shape tensors), retraced when another plan is bound;
- what cannot be captured falls back to the eager step, and the request's result says which ran
  (``GenerationResult.decode_step``): installed hooks (they read the step number in Python), statistics
  requests, the reference / triton backends, attention-score edits at decode (biases, VAR, counterfactuals:
  the backends mask keys from the plan's key index, which knows nothing of the static cache's empty columns),
  or a failed trace;
- a row operation of the batch (requests leaving or joining, compaction) copies the static cache back into
  a DynamicCache first; the next decode builds a new static one (a graph of a shape seen before is reused).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache, StaticCache

from clearsight.kernels.context import use_backend, use_plan, use_traced
from clearsight.kernels.plan import AttentionPlan

if TYPE_CHECKING:
    from clearsight.decoding.batch import Batch

CAPACITY_ROUND = 64  # static cache lengths are multiples of this: fewer distinct shapes, fewer graphs
CAPTURABLE_BACKENDS = ("torch", "sdpa")  # backends whose attention is tensor ops dynamo can trace

# torch.compile's backend for the step. Tests set "aot_eager" (dynamo's capture and the static cache, without
# inductor's code generation, which takes minutes on a small CPU); ``step_function`` caches per (model, backend).
COMPILER = "inductor"

_STEPS: weakref.WeakKeyDictionary[torch.nn.Module, dict[str, Callable]] = weakref.WeakKeyDictionary()


class NotCapturable(Exception):
    """The step cannot run compiled; the message says why (shown in the result's ``decode_step``)."""


def compile_mode(device: torch.device) -> str | None:
    """``reduce-overhead`` (CUDA graphs) on a GPU; the default mode elsewhere (CUDA graphs need CUDA)."""
    return "reduce-overhead" if device.type == "cuda" else None


def step_function(model: torch.nn.Module) -> Callable:
    """The compiled forward of one decode step of ``model`` (one per model, built on first use)."""
    fns = _STEPS.setdefault(model, {})
    fn = fns.get(COMPILER)
    if fn is None:
        def step(input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 cache: StaticCache) -> torch.Tensor:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float()

        device = next(model.parameters()).device
        mode = compile_mode(device) if COMPILER == "inductor" else None
        fn = torch.compile(step, backend=COMPILER, mode=mode, fullgraph=True, dynamic=False)
        fns[COMPILER] = fn
    return fn


def decode_plan(plan: AttentionPlan, num_keys: int) -> AttentionPlan | None:
    """The plan a decode step must see: None when no layer edits or observes attention at decode."""
    if plan.stats.segment_mass or plan.stats.last_row:
        return plan
    if plan.has_custom_mask and not plan.only_generated_queries(1, num_keys):
        return plan
    if any(plan.layer_edit(layer) is not None for layer in range(plan.num_layers)):
        return plan
    return None


def why_not(batch: Batch) -> str | None:
    """Why ``batch`` cannot run the compiled step (None: it can)."""
    if batch.backend not in CAPTURABLE_BACKENDS:
        return f"the {batch.backend} backend is not captured (compiled: {', '.join(CAPTURABLE_BACKENDS)})"
    if batch.stats is not None:
        return "attention statistics were requested"
    if "sliding_attention" in (getattr(batch.lvlm.model.config.get_text_config(), "layer_types", None) or ()):
        # transformers' StaticCache keeps only the window in those layers, the plan indexes every key
        return "the model has sliding-window layers, which the static cache does not keep whole"
    for e in batch.entries:
        if e.installed:
            names = ", ".join(m.name for m in e.mitigations)
            return f"hooks installed by the mitigations ({names}) run Python per step"
    plan = batch.plan
    for layer in range(plan.num_layers):
        edit = plan.layer_edit(layer)
        if edit is not None and edit.edits_scores:
            # the backends' score edits mask keys from the plan's own key index (padding, causality), which
            # would count the static cache's empty columns as keys: only stock attention (the model's mask)
            # and per-head output scales are captured
            names = ", ".join(m.name for m in batch.entries[0].mitigations) or "a mitigation"
            return f"attention-score edits at decode (layer {layer}, by {names}) are not captured"
    return None


class StaticDecode:
    """A batch's KV cache, preallocated, and its compiled step (see the module docstring)."""

    def __init__(self, batch: Batch, capacity: int) -> None:
        dyn = batch.cache
        B, L = batch.num_rows, dyn.layers[0].keys.shape[2]  # the mask already has this step's column
        capacity = -(-capacity // CAPACITY_ROUND) * CAPACITY_ROUND
        self.capacity = capacity
        self.length = L  # keys written so far
        self.cache = StaticCache(config=batch.lvlm.model.config, max_cache_len=capacity)
        for layer, src in zip(self.cache.layers, dyn.layers):
            layer.lazy_initialization(src.keys, src.values)
            layer.keys[:, :, :L].copy_(src.keys)
            layer.values[:, :, :L].copy_(src.values)
            layer.cumulative_length.fill_(L)
        self.mask = batch.mask.new_zeros(B, capacity)
        self.mask[:, :L] = batch.mask[:, :L]
        self.plan = decode_plan(batch.plan, capacity)
        self.full_plan, self.backend = batch.plan, batch.backend
        self.fn = step_function(batch.lvlm.adapter.decode_model)

    def step(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """One decode step: writes key column ``length``, returns the float logits [B, V]."""
        if self.length >= self.capacity:
            raise NotCapturable("the static cache is full")
        self.mask[:, self.length] = 1
        # the eager bindings too: where dynamo runs the step's Python itself (past its recompile limit, say)
        # the forward still sees the plan and the backend
        with use_plan(self.full_plan), use_backend(self.backend), use_traced(self.plan, self.backend):
            logits = self.fn(input_ids, position_ids, self.mask, self.cache)
        self.length += 1
        return logits.clone()  # CUDA graphs reuse their output buffers: the caller keeps a copy

    def to_dynamic(self, config) -> DynamicCache:
        """The keys written so far as a DynamicCache (for the batch's row operations and the eager step)."""
        dyn = DynamicCache()  # every layer keeps every key, as the batch's own cache (batch.full_cache)
        for i, layer in enumerate(self.cache.layers):
            dyn.update(layer.keys[:, :, :self.length].clone(), layer.values[:, :, :self.length].clone(), i)
        return dyn
