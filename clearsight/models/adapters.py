"""One Adapter per model family: everything family-specific that the rest of clearsight needs.

Mitigations and the decoding loop never reach into model internals; they ask the adapter for
shapes, the image-token spans and grids, prompts in the model's chat template, forward inputs,
position ids, and hooks on decoder-layer inputs and per-head attention outputs.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import (
    Gemma3ForConditionalGeneration,
    InstructBlipForConditionalGeneration,
    InternVLForConditionalGeneration,
    LlavaForConditionalGeneration,
    LlavaNextForConditionalGeneration,
    LlavaOnevisionForConditionalGeneration,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
    SmolVLMForConditionalGeneration,
)

from clearsight.errors import InputError
from clearsight.kernels.plan import AttentionPlan, RowLayout, Segment, default_position_ids

LayerInputHook = Callable[[int, torch.Tensor], torch.Tensor | None]
HeadOutputHook = Callable[[int, torch.Tensor], torch.Tensor | None]
VisionAttentionHook = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor | None]


class HookHandles:
    """Removable group of torch hook handles (use as a context manager)."""

    def __init__(self, handles: list[Any]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self) -> HookHandles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()



class ImageFeatureCache:
    """Encoded images by pixel content, least recently used dropped first, at most ``max_bytes`` held.

    An eval asks about the same image many times (several questions per image, every system of a job); its
    vision tower and projector are a pure function of the pixels, so their output is computed once. Callers
    only use it where that holds (no hooks on the tower, no gradients; see ``LlavaAdapter.forward_inputs``).
    """

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # engines on other models may share nothing, but probes and tests may
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor) -> tuple:
        """The content of one image's processed pixels (shape, dtype, bytes digest)."""
        t = pixels.detach().contiguous().cpu()
        digest = hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=16).hexdigest()
        return tuple(t.shape), str(t.dtype), digest

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            value = self._items.get(key)
            if value is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: tuple, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self.max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0


def _foreign(hooks: dict[int, Callable]) -> bool:
    # transformers installs its own output-capturing hooks on the tower's layers at the first forward; they
    # only record outputs when asked, so they do not count
    return any(getattr(h, "__module__", None) != "transformers.utils.output_capturing" for h in hooks.values())


def _has_hooks(*modules: torch.nn.Module) -> bool:
    """Any forward (pre-)hook on these modules or their children, or a global one (it may change the output)."""
    from torch.nn.modules import module as nn_module

    if _foreign(nn_module._global_forward_hooks) or _foreign(nn_module._global_forward_pre_hooks):
        return True
    return any(_foreign(m._forward_hooks) or _foreign(m._forward_pre_hooks) for top in modules for m in top.modules())


def encode_nested(adapter: Adapter, texts: list[str], images: list[Image.Image | list[Image.Image] | None]
                  ) -> dict[str, torch.Tensor]:
    """Left-padded processor tensors for processors that take each row's images as a list (a row without: [])."""
    nested = [[] if row is None else (list(row) if isinstance(row, list) else [row]) for row in images]
    adapter.tokenizer.padding_side = "left"
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if any(nested):
        kwargs["images"] = nested
    return {k: v for k, v in dict(adapter.processor(**kwargs)).items() if isinstance(v, torch.Tensor)}


def center_crop_box(image_processor: Any, image: Image.Image) -> tuple[int, int, int, int] | None:
    """The region a CLIP-style processor keeps (resize shortest edge, then center crop); None = all of it."""
    if not getattr(image_processor, "do_center_crop", False):
        return None

    def get(d: Any, key: str) -> Any:
        return d.get(key) if isinstance(d, dict) else getattr(d, key, None)  # dict or transformers' SizeDict

    size, crop = getattr(image_processor, "size", None), getattr(image_processor, "crop_size", None)
    short = get(size, "shortest_edge")
    if not short or crop is None:
        return None
    w, h = image.size
    scale = short / min(w, h)
    cw, ch = (get(crop, "width") or short) / scale, (get(crop, "height") or short) / scale
    left, top = max((w - cw) / 2, 0), max((h - ch) / 2, 0)
    return (round(left), round(top), round(min(left + cw, w)), round(min(top + ch, h)))

class Adapter:
    """Base adapter for HF LVLMs whose language model is ``model.model.language_model``."""

    family: ClassVar[str] = "base"
    model_classes: ClassVar[tuple[type, ...]] = ()
    # VAR sink dimensions of the language model, keyed by hidden size (Kang et al. 2025, Table 6; reference notes)
    sink_dimensions: ClassVar[dict[int, tuple[int, ...]]] = {}

    # Capabilities: what mitigations ask instead of testing family names (meanings in CAPABILITIES below).
    has_cls_vision_attention: ClassVar[bool] = False
    vision_feature_hook: ClassVar[bool] = False
    plain_1d_positions: ClassVar[bool] = True
    single_grid_per_image: ClassVar[bool] = True
    center_crop_preprocess: ClassVar[bool] = False
    image_grid_2d: ClassVar[bool] = True
    causal_image_tokens: ClassVar[bool] = True
    several_images_per_prompt: ClassVar[bool] = True

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self._cls_rows = ImageFeatureCache(64 << 20)  # vision_cls_attentions, per image

    # ------------------------------------------------------------------ shapes
    @property
    def text_config(self):
        return self.model.config.text_config

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        return int(getattr(self.text_config, "num_key_value_heads", None) or self.num_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.text_config, "head_dim", None) or self.hidden_size // self.num_heads)

    @property
    def max_context(self) -> int | None:
        """The language model's context length in tokens (``max_position_embeddings`` of its text config),
        None when the config does not say. A prompt (images expanded) plus its new tokens must fit in it."""
        n = getattr(self.text_config, "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    @property
    def decoder_layers(self) -> Sequence[torch.nn.Module]:
        return self.language_model.layers

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_tower

    @property
    def image_token_id(self) -> int:
        cfg = self.model.config
        return int(getattr(cfg, "image_token_id", None) or cfg.image_token_index)

    @property
    def eos_token_ids(self) -> set[int]:
        ids: set[int] = set()
        for src in (self.model.generation_config, self.model.config, self.text_config):
            e = getattr(src, "eos_token_id", None)
            if e is not None:
                ids.update(e if isinstance(e, list | tuple) else [e])
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else next(iter(self.eos_token_ids)))

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "class": type(self.model).__name__,
            "layers": self.num_layers,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_context": self.max_context,
            **capabilities(type(self)),
        }

    # ------------------------------------------------------------------ prompts and inputs
    def chat_prompt(self, prompt: str, has_image: bool | int, add_generation_prompt: bool = True) -> str:
        """The prompt in the model's chat template, ready for generation (``add_generation_prompt=False``: the
        user turn alone, without the assistant marker the template appends). ``has_image``: True / False, or
        the number of images (their slots come first, in order)."""
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(int(has_image))]
        content.append({"type": "text", "text": prompt})
        messages = [{"role": "user", "content": content}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                  tokenize=False)

    def count_tokens(self, text: str) -> int:
        """Tokens of a chat-formatted prompt as the processor tokenises it, before any image expansion."""
        return len(self.tokenizer(text)["input_ids"])

    def encode(self, texts: list[str], images: list[Image.Image | list[Image.Image] | None]
               ) -> dict[str, torch.Tensor]:
        """Tokenise a batch (left padding); images only for the rows that have one (a list: several, in order)."""
        present = [im for row in images if row is not None for im in (row if isinstance(row, list) else [row])]
        self.tokenizer.padding_side = "left"
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if present:
            kwargs["images"] = present
        batch = dict(self.processor(**kwargs))
        return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The prefill inputs beyond ids / mask / positions (pixel values and family extras)."""
        return {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}

    def forward(self, **inputs: Any) -> Any:
        """One forward (a prefill with ``forward_inputs``, or a decode step); the output has ``logits`` and ``cache``.

        The model itself for every family whose wrapper also runs text-only and decode steps; a family whose
        wrapper needs images on every call (InstructBLIP) runs its language model here instead.
        """
        return self.model(**inputs)

    @property
    def decode_model(self) -> torch.nn.Module:
        """The module a compiled decode step calls (ids, mask, positions, cache: no image inputs)."""
        return self.model

    # ------------------------------------------------------------------ image spans
    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        """(rows, cols) of each image's token grid, in the order images appear in the batch."""
        side = int(self.vision_tower.config.image_size // self.vision_tower.config.patch_size)
        n = len(batch.get("pixel_values", ()))
        return [(side, side)] * n

    def vision_tiles_per_image(self, batch: dict[str, torch.Tensor]) -> list[int]:
        """How many rows of the vision tower's batch each image takes (anyres families: its tiles), in image order."""
        return [1] * len(batch.get("pixel_values", ()))

    def image_pixel_slices(self, batch: dict[str, torch.Tensor]) -> list[slice]:
        """Where each image's processed pixels sit along dim 0 of ``batch["pixel_values"]`` (in image order)."""
        n = len(batch.get("pixel_values", ()))
        return [slice(i, i + 1) for i in range(n)]

    def grid_box(self, image: Image.Image) -> tuple[int, int, int, int] | None:
        """The region (left, top, right, bottom, in pixels) of ``image`` that the token grid covers; None = all
        of it (the processor resizes the whole image)."""
        return None

    def grid_start(self, span: tuple[int, int], grid: tuple[int, int]) -> int:
        """Where the rows x cols ``grid`` that covers ``grid_box`` starts in an image's token ``span``: its first
        token (LLaVA-NeXT / OneVision: the base grid comes first; InternVL: its thumbnail, the last tile)."""
        return span[0]

    def image_token_counts(self, batch: dict[str, torch.Tensor]) -> list[int] | None:
        """Image tokens of each image (in batch order) when the family fixes them (rows x cols of its grid), so
        that two images whose slots tokenise back to back are two spans; None = one span per run of image tokens."""
        return None

    def row_layouts(self, batch: dict[str, torch.Tensor]) -> list[RowLayout]:
        ids = batch["input_ids"]
        mask = batch["attention_mask"]
        grids = iter(self.image_grid_shapes(batch))
        counts = self.image_token_counts(batch)
        sizes = iter(counts) if counts is not None else None
        layouts = []
        for b in range(ids.shape[0]):
            pad = int((mask[b] == 0).sum())
            spans = _runs(ids[b] == self.image_token_id)
            if sizes is not None:
                spans = _split_runs(spans, sizes)
            layouts.append(RowLayout(pad=pad, image_spans=tuple(spans), grids=tuple(next(grids) for _ in spans)))
        return layouts

    def segments(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        seg = torch.full(batch["input_ids"].shape, int(Segment.TEXT), dtype=torch.int8)
        seg[batch["input_ids"] == self.image_token_id] = int(Segment.IMAGE)
        return seg

    def prepare_plan(self, plan: AttentionPlan) -> None:
        """Write what the family's own attention mask does beyond padding and causality into a new plan (before
        it runs), so the backends execute it; nothing for causal families (Gemma 3: its image blocks)."""

    # ------------------------------------------------------------------ positions
    def prefill_position_ids(self, batch: dict[str, torch.Tensor], layouts: list[RowLayout]) -> torch.Tensor:
        pad = torch.tensor([lay.pad for lay in layouts], device=batch["input_ids"].device)
        return default_position_ids(pad, batch["input_ids"].shape[1])

    def next_position_ids(self, last: torch.Tensor) -> torch.Tensor:
        """Positions of the next token given the previous ones ([B, 1] or [3, B, 1])."""
        return last + 1

    @staticmethod
    def last_positions(position_ids: torch.Tensor) -> torch.Tensor:
        return position_ids[..., -1:]

    # ------------------------------------------------------------------ hooks
    def has_forward_hooks(self) -> bool:
        """Whether any forward (pre-)hook sits on the model (a mitigation's, a probe caller's, a user's): rows of a
        batch may then not share a forward (``decoding.batch``), since a hook sees and indexes the batch's rows."""
        return _has_hooks(self.model)

    def hook_layer_inputs(self, fn: LayerInputHook) -> HookHandles:
        """Call ``fn(layer, hidden_states)`` before each decoder layer; a returned tensor replaces the input."""
        handles = []
        for i, layer in enumerate(self.decoder_layers):

            def pre(module, args, kwargs, i=i):
                hidden = args[0] if args else kwargs["hidden_states"]
                new = fn(i, hidden)
                if new is None:
                    return None
                if args:
                    return (new, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": new}

            handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        return HookHandles(handles)

    def hook_head_outputs(self, fn: HeadOutputHook) -> HookHandles:
        """Call ``fn(layer, x)`` on each layer's per-head attention output ``x`` [B, L, H, D] before o_proj.

        A returned tensor of the same shape replaces it (VHR measures and scales heads here).
        """
        H, D = self.num_heads, self.head_dim
        handles = []
        for i, layer in enumerate(self.decoder_layers):

            def pre(module, args, i=i):
                x = args[0]
                new = fn(i, x.view(*x.shape[:-1], H, D))
                if new is None:
                    return None
                return (new.reshape(x.shape), *args[1:])

            handles.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
        return HookHandles(handles)

    # ------------------------------------------------------------------ vision tower
    def vision_attentions(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Attention maps of every vision-tower layer, [N, heads, T, T] each (CLS first for CLIP).

        Runs the tower once more with eager attention on the vision side only (the language model
        keeps its backend); used by the imbalanced-attention fix's token selection.
        """
        tower = self.vision_tower
        cfg = tower.config
        previous = cfg._attn_implementation
        try:
            cfg._attn_implementation = "eager"
            with torch.no_grad():
                out = tower(pixel_values.to(self.model.dtype), output_attentions=True)
        finally:
            cfg._attn_implementation = previous
        if not out.attentions:
            raise RuntimeError(f"{type(tower).__name__} returned no attention maps")
        return tuple(out.attentions)


    def vision_cls_attentions(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The CLS query row of every vision-tower layer's attention, [N, heads, T] each: ``vision_attentions``
        cut to what the imbalanced-attention fix reads, remembered per set of pixels (a job asks about each
        image many times; the maps are a pure function of the pixels). Recomputed while a hook sits on the tower."""
        if _has_hooks(self.vision_tower):
            return tuple(a[:, :, 0] for a in self.vision_attentions(pixel_values))
        cache = self._cls_rows
        key = cache.key(pixel_values)
        rows = cache.get(key)
        if rows is None:
            rows = torch.stack([a[:, :, 0] for a in self.vision_attentions(pixel_values)])  # [layers, N, heads, T]
            cache.put(key, rows)
        return tuple(rows)

    @property
    def vision_feature_attention_index(self) -> int | None:
        """Index into ``vision_attentions()`` of the layer whose output the projector reads
        (``hidden_states[vision_feature_layer]``: LLaVA-1.5 -2, the demo model -1); None when the config has none."""
        layer = getattr(self.model.config, "vision_feature_layer", None)
        if not isinstance(layer, int) or isinstance(layer, bool):
            return None
        return layer if layer < 0 else layer - 1  # hidden_states[0] are the embeddings

    def hook_vision_feature_attention(self, fn: VisionAttentionHook) -> HookHandles:
        """Call ``fn(attn, hidden_states, output)`` at the self-attention of the vision layer the projector reads.

        That layer is the one whose output is ``hidden_states[vision_feature_layer]`` (LLaVA: -2, the
        penultimate layer). ``attn`` is the CLIP-style attention module (``q_proj``, ``k_proj``,
        ``v_proj``, ``out_proj``, ``num_heads``, ``scale``), ``hidden_states`` [N, T, C] its input and
        ``output`` [N, T, C] its output before the residual, N = the images (LLaVA-NeXT: their tiles) in
        pixel-value order. A returned tensor replaces the output (CausalMM's vision-level counterfactual).
        """
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)  # older transformers nest it
        layers = getattr(getattr(tower, "encoder", None), "layers", None)
        layer = getattr(self.model.config, "vision_feature_layer", None)
        if layers is None or not hasattr(layers[0].self_attn, "q_proj") or not isinstance(layer, int):
            raise InputError(f"{type(self.vision_tower).__name__} has no CLIP-style feature layer to hook "
                             f"({self.family}): vision-level attention edits need a LLaVA / LLaVA-NeXT model")
        index = (layer if layer >= 0 else len(layers) + 1 + layer) - 1  # hidden_states[0] = the embeddings
        if not 0 <= index < len(layers):
            raise InputError(f"vision_feature_layer {layer} selects no encoder layer")

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            first = output[0] if isinstance(output, tuple) else output
            new = fn(module, hidden, first)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return HookHandles([layers[index].self_attn.register_forward_hook(hook, with_kwargs=True)])


def _runs(flags: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    spans = []
    start = None
    for i, f in enumerate(flags.tolist()):
        if f and start is None:
            start = i
        elif not f and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(flags)))
    return spans


def _split_runs(spans: list[tuple[int, int]], sizes) -> list[tuple[int, int]]:
    """Cut runs of image tokens into consecutive images of the given token counts (taken from ``sizes``)."""
    out = []
    for s, e in spans:
        while s < e:
            n = next(sizes, e - s)
            out.append((s, min(s + n, e)))
            s += n
    return out


class LlavaAdapter(Adapter):
    """LLaVA-1.5 (``LlavaForConditionalGeneration``): CLIP tower, one square grid of patches."""

    family = "llava"
    model_classes = (LlavaForConditionalGeneration,)
    sink_dimensions = {4096: (2533, 1415), 5120: (2100, 4743)}
    has_cls_vision_attention = True
    vision_feature_hook = True
    center_crop_preprocess = True

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        super().__init__(model, processor)
        self.image_features = ImageFeatureCache()

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The pixels' encoded features (``mm_encoder_outputs``) in place of the pixels: each distinct image goes
        through the vision tower and projector once, later prefills reuse it (``ImageFeatureCache``).

        Bit for bit the features the model computes itself: the same ``get_image_features`` on a subset of the
        images, and the tower treats every image of its batch on its own (checked on CPU:
        ``tests/test_image_feature_cache.py``). Not used while any hook sits on the tower or projector
        (CausalMM's vision-level counterfactual rewrites one row's tower output), with gradients, in training
        mode, or with extra image inputs."""
        inputs = super().forward_inputs(batch)
        pixels = inputs.get("pixel_values")
        inner = self.model.model
        if (pixels is None or set(inputs) != {"pixel_values"} or pixels.ndim != 4 or torch.is_grad_enabled()
                or self.model.training or _has_hooks(inner.vision_tower, inner.multi_modal_projector)):
            return inputs
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        cache = self.image_features
        keys = [cache.key(p) for p in pixels]
        features: list[torch.Tensor | None] = [cache.get(k) for k in keys]
        missing: dict[tuple, list[int]] = {}
        for i, (k, f) in enumerate(zip(keys, features)):
            if f is None:
                missing.setdefault(k, []).append(i)
        if missing:
            first = [rows[0] for rows in missing.values()]
            out = inner.get_image_features(pixel_values=pixels[first], return_dict=True).pooler_output
            for rows, f in zip(missing.values(), out):
                f = f.clone()  # not a view of the whole batch's tensor, which the cache would keep alive
                cache.put(keys[rows[0]], f)
                for i in rows:
                    features[i] = f
        return {"mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=features)}}

    def image_token_counts(self, batch: dict[str, torch.Tensor]) -> list[int] | None:
        return [r * c for r, c in self.image_grid_shapes(batch)]

    def grid_box(self, image: Image.Image) -> tuple[int, int, int, int] | None:
        """CLIP's processor resizes the shortest edge and center-crops: the grid covers the crop."""
        return center_crop_box(getattr(self.processor, "image_processor", None), image)


class LlavaNextAdapter(Adapter):
    """LLaVA-NeXT: each image is a base grid followed by anyres tiles with image-newline tokens.

    The grid reported per image is the base grid (the first rows x cols tokens of the span); the
    high-resolution part that follows has a newline token per row and is treated as image tokens.
    """

    family = "llava_next"
    model_classes = (LlavaNextForConditionalGeneration,)
    several_images_per_prompt = False  # the images' anyres spans run together (one span per prompt)
    sink_dimensions = {4096: (2533, 1415), 5120: (2100, 4743)}
    has_cls_vision_attention = True
    vision_feature_hook = True
    single_grid_per_image = False

    def vision_tiles_per_image(self, batch: dict[str, torch.Tensor]) -> list[int]:
        # the processor pads pixel_values to the most tiles in the batch; the model keeps each image's own count
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
                for s in batch.get("image_sizes", torch.empty(0, 2)).tolist()]


class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's anyres layout (base grid, then tiles with newline tokens) on a SigLIP tower.

    SigLIP has no CLS token, so there is no CLS->patch attention map; the feature layer is still hookable.
    """

    family = "llava_onevision"
    model_classes = (LlavaOnevisionForConditionalGeneration,)
    sink_dimensions = {}
    has_cls_vision_attention = False

    def vision_tiles_per_image(self, batch: dict[str, torch.Tensor]) -> list[int]:
        # the model's own tile count (OneVision keeps its own copy of the LLaVA-NeXT function)
        from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(image_size=s, grid_pinpoints=cfg.image_grid_pinpoints,
                                          patch_size=cfg.vision_config.image_size)
                for s in batch.get("image_sizes", torch.empty(0, 2)).tolist()]


class Qwen2VLAdapter(Adapter):
    """Qwen2-VL: dynamic-resolution grids, 2x2 patch merging, 3-D M-RoPE position ids."""

    family = "qwen2_vl"
    model_classes = (Qwen2VLForConditionalGeneration,)
    sink_dimensions = {3584: (458, 2570)}
    plain_1d_positions = False

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.visual

    def forward_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in batch.items() if k in ("pixel_values", "image_grid_thw")}

    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        merge = int(self.model.config.vision_config.spatial_merge_size)
        thw = batch.get("image_grid_thw")
        if thw is None:
            return []
        return [(int(h) // merge, int(w) // merge) for _, h, w in thw.tolist()]

    def image_token_counts(self, batch: dict[str, torch.Tensor]) -> list[int] | None:
        return [r * c for r, c in self.image_grid_shapes(batch)]

    def image_pixel_slices(self, batch: dict[str, torch.Tensor]) -> list[slice]:
        # pixel_values are the flattened patches of all images; each image has t * h * w of them
        thw = batch.get("image_grid_thw")
        if thw is None:
            return []
        out, start = [], 0
        for t, h, w in thw.tolist():
            out.append(slice(start, start + t * h * w))
            start += t * h * w
        return out

    def prefill_position_ids(self, batch: dict[str, torch.Tensor], layouts: list[RowLayout]) -> torch.Tensor:
        """[3, B, L] M-RoPE positions from the model's own ``get_rope_index``."""
        if batch.get("image_grid_thw") is None:
            pos = super().prefill_position_ids(batch, layouts)
            return pos.unsqueeze(0).expand(3, -1, -1).clone()
        pos, _ = self.model.model.get_rope_index(
            batch["input_ids"],
            mm_token_type_ids=batch["mm_token_type_ids"],
            image_grid_thw=batch["image_grid_thw"],
            attention_mask=batch["attention_mask"],
        )
        return pos

    @staticmethod
    def last_positions(position_ids: torch.Tensor) -> torch.Tensor:
        # the next text token continues after the largest position used so far in the row
        return position_ids.amax(dim=(0, 2), keepdim=True).expand(3, -1, 1)

    def vision_attentions(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise InputError(
            "the imbalanced-attention token selection needs CLS->patch attention, which Qwen2-VL's vision "
            "tower (no CLS token) does not have: use a LLaVA or LLaVA-NeXT model"
        )


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: Qwen2-VL's layout and M-RoPE; the vision tower adds windowed attention (stock, untouched)."""

    family = "qwen2_5_vl"
    model_classes = (Qwen2_5_VLForConditionalGeneration,)
    sink_dimensions = {}


class Qwen3VLAdapter(Qwen2VLAdapter):
    """Qwen3-VL: Qwen2-VL's layout (merged 2x2 patches, 3-D M-RoPE from the model's ``get_rope_index``) with DeepStack.

    DeepStack adds features of early vision layers to the image tokens' hidden states after each of the first
    ``len(deepstack_visual_indexes)`` decoder layers, inside the model's own forward (prefill only: the image
    tokens are all there). Layer-input hooks therefore see the hidden states with those features added, as the
    next layer does, and attention edits act on the keys the layers really attend to. Interleaved M-RoPE and
    the QK-norm are applied before the attention backend is called, so the backends see ordinary q / k.
    The processor's timestamp tokens belong to videos only; images are ``<|vision_start|>``, the grid,
    ``<|vision_end|>``, as in Qwen2-VL.
    """

    family = "qwen3_vl"
    model_classes = (Qwen3VLForConditionalGeneration,)
    sink_dimensions = {}


class SmolVLMAdapter(Adapter):
    """SmolVLM: each image is split into tiles plus a downscaled global image; every one is a square grid.

    Token layout of an image (the processor's): per tile ``<fake_token_around_image><row_i_col_j>`` then its
    grid, a newline after each row of tiles, then ``<fake_token_around_image><global-img>``, the global grid,
    ``<fake_token_around_image>``. The markers are text tokens. Each grid (a tile's or the global image's) is
    one image span of ``side x side`` tokens (``side`` = tile patches per side / the pixel-shuffle factor,
    row-major, as the connector's pixel shuffle orders them). Spans are reported per image with the global
    image's span first: ``image_spans[0]`` and ``grids[0]`` cover the whole image (as LLaVA-NeXT's base grid
    does), so maps over "the first grid" (AGLA's attention matcher, CARVE, the dashboard) read the global
    view; the tiles follow in reading order.

    Pixels: the processor pads each row's tiles to the batch's largest count with all-zero tiles, which the
    model drops; ``encode`` keeps only the real tiles, one per row of ``pixel_values`` ([tiles, 1, C, H, W]),
    so that a branch's pixel transform (VCD's noise) touches its own image's tiles and never a padding tile.
    """

    family = "smolvlm"
    model_classes = (SmolVLMForConditionalGeneration,)
    several_images_per_prompt = False  # tiles of several images are not told apart by the layout
    has_cls_vision_attention = False  # a SigLIP-style tower: no CLS token
    vision_feature_hook = True
    single_grid_per_image = False

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model.text_model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.model.vision_model

    @property
    def grid_side(self) -> int:
        """Tokens per side of each tile's grid (and of the global image's)."""
        vc = self.model.config.vision_config
        return int(vc.image_size // vc.patch_size // self.model.config.scale_factor)

    def encode(self, texts: list[str], images: list[Image.Image | list[Image.Image] | None]
               ) -> dict[str, torch.Tensor]:
        """As the base class, with images nested per row (the processor's layout) and only the real tiles kept."""
        batch = encode_nested(self, texts, images)
        if "pixel_values" in batch:
            # row b's tiles are its first (runs of image tokens) entries; the rest are the processor's padding
            counts = [len(_runs(ids == self.image_token_id)) for ids in batch["input_ids"]]
            for key in ("pixel_values", "pixel_attention_mask"):
                if key in batch:
                    v = batch[key]
                    batch[key] = torch.cat([v[b, :n] for b, n in enumerate(counts)]).unsqueeze(1)
        return batch

    def _image_runs(self, ids: torch.Tensor) -> list[list[tuple[int, int]]]:
        """The runs of image tokens of one row, grouped per image (its tiles, then its global image)."""
        global_id = self.tokenizer.convert_tokens_to_ids(getattr(self.processor, "global_image_token", "<global-img>"))
        images, current = [], []
        for s, e in _runs(ids == self.image_token_id):
            current.append((s, e))
            if s > 0 and int(ids[s - 1]) == global_id:  # the global image closes an image's block
                images.append(current)
                current = []
        if current:  # a block without a global image (not the processor's layout): its runs as they are
            images.append(current)
        return images

    def row_layouts(self, batch: dict[str, torch.Tensor]) -> list[RowLayout]:
        side = self.grid_side
        layouts = []
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            spans = [span for runs in self._image_runs(ids) for span in (runs[-1:] + runs[:-1])]  # global first
            layouts.append(RowLayout(pad=int((mask == 0).sum()), image_spans=tuple(spans),
                                     grids=tuple((side, side) for _ in spans)))
        return layouts

    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        return [g for lay in self.row_layouts(batch) for g in lay.grids]

    def vision_tiles_per_image(self, batch: dict[str, torch.Tensor]) -> list[int]:
        return [len(runs) for ids in batch["input_ids"] for runs in self._image_runs(ids)]

    def image_pixel_slices(self, batch: dict[str, torch.Tensor]) -> list[slice]:
        out, start = [], 0
        for n in self.vision_tiles_per_image(batch):
            out.append(slice(start, start + n))
            start += n
        return out

    @property
    def vision_feature_attention_index(self) -> int | None:
        return -1  # the connector reads the last encoder layer (through the post-layernorm)

    def hook_vision_feature_attention(self, fn: VisionAttentionHook) -> HookHandles:
        """As the base class, at the last encoder layer's SigLIP-style self-attention; N = the real tiles (each
        image's tiles then its global image), in ``pixel_values`` order."""
        attn = self.vision_tower.encoder.layers[-1].self_attn

        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            first = output[0] if isinstance(output, tuple) else output
            new = fn(module, hidden, first)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return HookHandles([attn.register_forward_hook(hook, with_kwargs=True)])


class InstructBlipAdapter(Adapter):
    """InstructBLIP with a decoder-only language model: the image is the Q-Former's learned query tokens.

    The processor puts ``num_query_tokens`` image tokens before the text (before BOS); the Q-Former reads the
    instruction too (``qformer_input_ids``, its own tokenizer). The query tokens are not patches: there is no
    2-D grid (``grids`` reports (1, queries), a row of tokens, with ``image_grid_2d`` False), so methods that map
    attention over image tokens onto the image, or that need a concentric grid, refuse. BLIP's ViT has a CLS
    token, but no image token of the language model stands for a patch.

    The stock wrapper's forward needs pixel values on every call; text-only rows and decode steps therefore run
    its language model directly (``forward``), prefills with images embed the queries as the wrapper does.
    """

    family = "instructblip"
    model_classes = (InstructBlipForConditionalGeneration,)
    several_images_per_prompt = False  # one block of queries per prompt
    has_cls_vision_attention = True
    single_grid_per_image = False
    image_grid_2d = False

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        if not model.config.use_decoder_only_language_model:
            raise InputError(f"InstructBLIP with an encoder-decoder language model "
                             f"({model.config.text_config.model_type}) is not supported: clearsight's decoding runs "
                             "decoder-only language models; use a Vicuna / OPT InstructBLIP checkpoint")
        super().__init__(model, processor)

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.language_model.model

    @property
    def vision_tower(self) -> torch.nn.Module:
        return self.model.vision_model

    @property
    def num_queries(self) -> int:
        return int(self.model.config.num_query_tokens)

    def chat_prompt(self, prompt: str, has_image: bool | int, add_generation_prompt: bool = True) -> str:
        """The prompt as InstructBLIP takes it (no chat template: the processor puts the image first), or the
        processor's chat template when it has one."""
        if int(has_image) > 1:
            raise InputError("instructblip takes one image per prompt (its query tokens come before the text): "
                             "send one image per request")
        if getattr(self.processor, "chat_template", None):
            return super().chat_prompt(prompt, has_image, add_generation_prompt)
        return prompt

    def encode(self, texts: list[str], images: list[Image.Image | list[Image.Image] | None]
               ) -> dict[str, torch.Tensor]:
        """Each row alone through the processor (it would put the queries in front of every row of a batch,
        and padding between them and the text), then left-padded; the Q-Former's ids are right-padded (its
        text positions start at 0), one row per image."""
        rows = []
        for text, image in zip(texts, images):
            if isinstance(image, list):
                if len(image) > 1:
                    raise InputError("instructblip takes one image per prompt (its query tokens come before the "
                                     "text): send one image per request")
                image = image[0] if image else None
            rows.append(self.processor(text=[text], images=[image] if image is not None else None,
                                       return_tensors="pt"))
        width = max(int(r["input_ids"].shape[1]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            n = int(r["input_ids"].shape[1])
            ids[b, width - n:], mask[b, width - n:] = r["input_ids"][0], r["attention_mask"][0]
        batch = {"input_ids": ids, "attention_mask": mask}
        with_image = [r for r in rows if "pixel_values" in r]
        if with_image:
            batch["pixel_values"] = torch.cat([r["pixel_values"] for r in with_image])
            qpad = self.processor.qformer_tokenizer.pad_token_id or 0
            qwidth = max(int(r["qformer_input_ids"].shape[1]) for r in with_image)
            qids = torch.full((len(with_image), qwidth), qpad, dtype=torch.long)
            qmask = torch.zeros((len(with_image), qwidth), dtype=torch.long)
            for i, r in enumerate(with_image):
                n = int(r["qformer_input_ids"].shape[1])
                qids[i, :n], qmask[i, :n] = r["qformer_input_ids"][0], r["qformer_attention_mask"][0]
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = qids, qmask
        return batch

    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        return [(1, self.num_queries)] * len(batch.get("pixel_values", ()))

    def image_token_counts(self, batch: dict[str, torch.Tensor]) -> list[int] | None:
        return [self.num_queries] * len(batch.get("pixel_values", ()))

    def forward(self, **inputs: Any) -> Any:
        pixel_values = inputs.pop("pixel_values", None)
        qformer_ids = inputs.pop("qformer_input_ids", None)
        qformer_mask = inputs.pop("qformer_attention_mask", None)
        lm = self.model.language_model
        if pixel_values is None:
            return lm(**inputs)
        # as the wrapper's forward: the projected query outputs replace the image tokens' embeddings
        ids = inputs.pop("input_ids")
        queries = self.model.get_image_features(pixel_values, qformer_input_ids=qformer_ids,
                                                qformer_attention_mask=qformer_mask, return_dict=True).pooler_output
        embeds = self.model.get_input_embeddings()(ids)
        where = self.model.get_placeholder_mask(ids, inputs_embeds=embeds)
        return lm(inputs_embeds=embeds.masked_scatter(where, queries.to(embeds.dtype)), **inputs)

    @property
    def decode_model(self) -> torch.nn.Module:
        return self.model.language_model


class InternVLAdapter(Adapter):
    """InternVL3 (``InternVLForConditionalGeneration``): InternViT tiles, pixel-unshuffle, a Qwen2 language model.

    The processor splits an image into up to ``max_patches`` tiles of the tower's size and, when there is more
    than one, appends a thumbnail of the whole image; each tile becomes ``image_seq_length`` tokens (its patch
    grid pixel-unshuffled by ``downsample_ratio``), all inside one ``<img> ... </img>`` span per image. The grid
    reported per image is one tile's (rows x cols) token grid; the span holds ``tiles`` of them, so there is no
    single grid per image; the whole image's grid is the thumbnail, the span's last tile (``grid_start``). The
    tower has a CLS token, but its maps are per tile and unshuffled 2x2, so no CLS->token-grid map is exposed;
    its attention module is not CLIP-style (``projection_layer``).
    """

    family = "internvl"
    model_classes = (InternVLForConditionalGeneration,)
    single_grid_per_image = False

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def tile_side(self) -> int:
        """Tokens per side of one tile's grid: (image_size / patch_size) * downsample_ratio."""
        vc = self.model.config.vision_config
        size = vc.image_size[0] if isinstance(vc.image_size, list | tuple) else vc.image_size
        patch = vc.patch_size[0] if isinstance(vc.patch_size, list | tuple) else vc.patch_size
        return int(size // patch * self.model.config.downsample_ratio)

    def vision_tiles_per_image(self, batch: dict[str, torch.Tensor]) -> list[int]:
        # the processor drops its per-image tile counts; each image's span of context tokens is tiles x grid
        per_tile = self.tile_side**2
        return [(e - s) // per_tile for row in batch["input_ids"] for s, e in _runs(row == self.image_token_id)]

    def image_pixel_slices(self, batch: dict[str, torch.Tensor]) -> list[slice]:
        out, start = [], 0
        for n in self.vision_tiles_per_image(batch):
            out.append(slice(start, start + n))
            start += n
        return out

    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        side = self.tile_side
        return [(side, side)] * len(self.vision_tiles_per_image(batch))

    def grid_start(self, span: tuple[int, int], grid: tuple[int, int]) -> int:
        # several tiles: the thumbnail of the whole image is the last tile; one tile: the tile is the whole image
        return span[1] - grid[0] * grid[1]

    def vision_attentions(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise InputError("the imbalanced-attention token selection needs one CLS->patch map per image grid; "
                         "InternVL's tiles are pixel-unshuffled, so it has none: use a LLaVA or LLaVA-NeXT model")


class Gemma3Adapter(Adapter):
    """Gemma 3 (``Gemma3ForConditionalGeneration``): SigLIP average-pooled to one square grid per image
    (``mm_tokens_per_image`` tokens between ``<start_of_image>`` and ``<end_of_image>``), 1-D positions.

    Its language model alternates sliding-window and global layers and scales queries by
    ``query_pre_attn_scalar``: the backends receive both (``sliding_window``, ``scaling``) and execute them. At
    prefill each image's tokens attend to the whole image (``token_type_ids``; transformers' blockwise mask);
    ``prepare_plan`` writes that block into the plan's prompt mask, so a mitigation that sets its own prompt
    mask (CCA, MMA) is refused (``causal_image_tokens``).
    """

    family = "gemma3"
    model_classes = (Gemma3ForConditionalGeneration,)
    causal_image_tokens = False
    BLOCK_OWNER: ClassVar[str] = "gemma3 image block"

    def __init__(self, model: PreTrainedModel, processor: ProcessorMixin) -> None:
        super().__init__(model, processor)
        if getattr(self.text_config, "use_bidirectional_attention", False):
            raise InputError("this Gemma 3 config has use_bidirectional_attention=True (an encoder, not a causal "
                             "LM): clearsight generates only with causal Gemma 3 models")

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def grid_side(self) -> int:
        return int(round(int(self.model.config.mm_tokens_per_image) ** 0.5))

    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        n = len(batch.get("pixel_values", ()))
        return [(self.grid_side, self.grid_side)] * n

    def image_token_counts(self, batch: dict[str, torch.Tensor]) -> list[int] | None:
        return [r * c for r, c in self.image_grid_shapes(batch)]

    def encode(self, texts: list[str], images: list[Image.Image | list[Image.Image] | None]
               ) -> dict[str, torch.Tensor]:
        """As ``Adapter.encode``; Gemma 3's processor takes the images nested per row (a row without: [])."""
        return encode_nested(self, texts, images)

    def prepare_plan(self, plan: AttentionPlan) -> None:
        """The prompt mask transformers builds from ``token_type_ids``: an image token also sees the later tokens
        of its own image (causal OR same image; rank = key index, so query i's limit is its image's last key)."""
        rows = [b for b, lay in enumerate(plan.layouts) if lay.image_spans]
        if not rows:
            return
        rank = torch.arange(plan.prompt_len, device=plan.device).repeat(len(rows), 1)
        limit = rank.clone()
        for i, b in enumerate(rows):
            for s, e in plan.layouts[b].image_spans:
                limit[i, s:e] = e - 1
        plan.set_mask(rows, rank, limit, owner=self.BLOCK_OWNER)

    def vision_attentions(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise InputError("the imbalanced-attention token selection needs CLS->patch attention, which Gemma 3's "
                         "SigLIP tower (no CLS token) does not have: use a LLaVA or LLaVA-NeXT model")


class TextOnlyAdapter(Adapter):
    """A text-only causal LM (no vision tower): usable as a judge model; images are refused."""

    family = "text"

    @property
    def text_config(self):
        return self.model.config

    @property
    def language_model(self) -> torch.nn.Module:
        return self.model.model

    @property
    def vision_tower(self) -> torch.nn.Module:
        raise InputError(f"{type(self.model).__name__} is a text-only model: it has no vision tower")

    @property
    def image_token_id(self) -> int:
        return -1  # matches no token

    def chat_prompt(self, prompt: str, has_image: bool | int, add_generation_prompt: bool = True) -> str:
        if has_image:
            raise InputError(
                f"{type(self.model).__name__} is a text-only model and cannot take an image: "
                "drop the image or load a vision-language model"
            )
        return super().chat_prompt(prompt, has_image=False, add_generation_prompt=add_generation_prompt)

    def image_grid_shapes(self, batch: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
        return []


# most specific first: adapter_for takes the first whose classes match
ADAPTERS: tuple[type[Adapter], ...] = (LlavaAdapter, LlavaNextAdapter, LlavaOnevisionAdapter, Qwen2VLAdapter,
                                       Qwen2_5_VLAdapter, Qwen3VLAdapter, SmolVLMAdapter, InstructBlipAdapter,
                                       InternVLAdapter, Gemma3Adapter)

CAPABILITIES: dict[str, str] = {
    "has_cls_vision_attention": "the vision tower prepends a CLS token whose attention to the patches can be read",
    "vision_feature_hook": "the projector reads one layer of a CLIP/SigLIP-style tower whose self-attention can be "
                           "hooked",
    "plain_1d_positions": "position ids are one integer per token (not 3-D M-RoPE), so a plan may override them",
    "single_grid_per_image": "each image is exactly one rows x cols block of tokens (no anyres tiles or newlines)",
    "center_crop_preprocess": "the processor resizes and center-crops (CLIP-style), so a box maps to the grid "
                              "through that crop",
    "image_grid_2d": "each image's tokens are a rows x cols grid of patches (not learned queries such as "
                     "InstructBLIP's Q-Former outputs), so attention over them maps onto the image",
    "several_images_per_prompt": "several images in one prompt get one image span (or grid set) each, so a "
                                 "mitigation may ask about [original, refined] together",
    "causal_image_tokens": "image tokens attend causally at prefill like text, so a mitigation may set the prompt "
                           "mask (Gemma 3's image tokens see their whole image: the plan's mask carries that block)",
}


def capabilities(cls: type[Adapter]) -> dict[str, bool]:
    """The capability flags of an adapter class (what mitigations ask of it)."""
    return {name: bool(getattr(cls, name)) for name in CAPABILITIES}


def adapter_for(model: PreTrainedModel, processor: ProcessorMixin) -> Adapter:
    for cls in ADAPTERS:
        if isinstance(model, cls.model_classes):
            return cls(model, processor)
    if not hasattr(model.config, "text_config") and hasattr(getattr(model, "model", None), "layers"):
        return TextOnlyAdapter(model, processor)
    supported = ", ".join(c.__name__ for a in ADAPTERS for c in a.model_classes)
    raise InputError(f"unsupported model class {type(model).__name__}: clearsight supports {supported}")
