#!/usr/bin/env python
"""Train ``builtin:shapes-llava``: a small LLaVA on the shapes world (reference/demo-model.md recipe).

Seeded and CPU-only (about 25 minutes on one core with the defaults):

1. vision pre-training: the CLIP vision tower alone, with a throw-away head that classifies the shape
   and colour in each of the 4 x 4 grid cells, on scenes *without* partner pairs (so the co-occurrence
   prior can only live in the language model);
1b. routing warm-up (``--routing-steps``): yes/no turns whose context is the caption *text*. A yes/no
   answer is an interaction of the asked object and the scene; with balanced answers neither alone
   predicts it, and with 64 image tokens in the context the LM stays on that plateau (at chance). On a
   short text context it learns the comparison, which stage 2 then carries over to the image;
2. vision tower frozen; projector + Llama LM trained on scenes *with* the pair structure and 10%
   near-invisible (but labelled) noise objects. Each image carries one caption turn and balanced yes/no
   turns that share the image prefix through a 4D attention mask (positions restart per turn); the loss
   is on the answer tokens and </s> only. A share of rows (``--stage2-text-prob``) keeps the warm-up's
   text-context yes/no turns;
3. yes/no emphasis: more yes/no turns per image, few captions.

Then the checkpoint is saved with ``save_pretrained`` (safetensors), reloaded through
``clearsight.load_model`` (the same path as any HF checkpoint), evaluated on held-out scenes from a
different seed with ``clearsight.generate`` (POPE random / popular / adversarial, CHAIR), and the scores
are written to ``MODEL_CARD.md`` and ``scores.json`` beside the weights.

    python scripts/train_shapes_llava.py --threads 1        # full run, writes the shipped checkpoint (24 min)
    python scripts/train_shapes_llava.py --quick --out /tmp/sl   # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from clearsight.evals.datasets.shapes import (  # noqa: E402
    LONG_CAPTION_WORDS,
    PARTNER_PAIRS,
    Scene,
    ShapesWorldSpec,
    generate_scenes,
    organism_spec,
    partner_rate,
    render_scene,
    scene_caption,
    shapes_chair_vocabulary,
)
from clearsight.models import shapes_llava as sl  # noqa: E402

DEFAULT_OUT = ROOT / "clearsight" / "models" / "weights" / "shapes-llava"
THRESHOLDS = {"pope_random_accuracy_min": 0.85, "chair_i_min_exclusive": 0.0, "chair_recall_min": 0.60}
CAPTION_RE = re.compile(r"^a (\w+) (\w+)((, a \w+ \w+)* and a \w+ \w+)?\.$")


def log(msg: str) -> None:
    print(msg, flush=True)


def world(args, **kw) -> ShapesWorldSpec:
    """The training / evaluation world: the shipped one, or issue 17's model organism (``--world organism``:
    small faint partners beside large triggers, long captions; ``organism_spec``)."""
    return organism_spec(**kw) if args.world == "organism" else ShapesWorldSpec(**kw)


# ----------------------------------------------------------------------------------------- data
class Pixels:
    """PIL scene -> normalised tensor, identical to the CLIP PIL image processor at 96 px (checked)."""

    def __init__(self, proc):
        ip = proc.image_processor
        self.mean = torch.tensor(ip.image_mean).view(3, 1, 1)
        self.std = torch.tensor(ip.image_std).view(3, 1, 1)

    def __call__(self, scenes: Sequence[Scene], spec: ShapesWorldSpec) -> torch.Tensor:
        arr = np.stack([np.asarray(render_scene(s, spec)) for s in scenes])
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std


def cell_targets(scenes: Sequence[Scene], spec: ShapesWorldSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per grid cell: shape class (0 = empty) and colour class (0 = empty), row-major."""
    shapes = {s: i + 1 for i, s in enumerate(spec.shapes)}
    colours = {c: i + 1 for i, c in enumerate(spec.colours)}
    g = spec.grid
    ts = torch.zeros(len(scenes), g * g, dtype=torch.long)
    tc = torch.zeros(len(scenes), g * g, dtype=torch.long)
    for b, sc in enumerate(scenes):
        for o in sc.objects:
            k = o.cell[0] * g + o.cell[1]
            ts[b, k] = shapes[o.shape]
            tc[b, k] = colours[o.colour]
    return ts, tc


class Packer:
    """Builds packed multi-turn rows: [<s> USER: <image>x64] + turn + turn + ..., each turn
    "{question} ASSISTANT: {answer}</s>" attending to the image prefix and to itself only."""

    def __init__(self, tok, n_image_tokens: int):
        self.tok = tok
        self.image_id = tok.convert_tokens_to_ids("<image>")
        self.prefix = [tok.bos_token_id, *tok("USER:", add_special_tokens=False)["input_ids"]]
        self.prefix += [self.image_id] * n_image_tokens
        self._cache: dict[str, list[int]] = {}

    def ids(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self._cache[text]

    def turn(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        q = self.ids(question + " ASSISTANT:")
        a = self.ids(answer) + [self.tok.eos_token_id]
        return q + a, [-100] * len(q) + a

    def text_prefix(self, context: str) -> list[int]:
        """A text-only row's prefix: [<s> USER: {context}] (auxiliary rows, no image)."""
        return [self.tok.bos_token_id, *self.ids("USER: " + context)]

    def batch(self, rows: list[list[tuple[str, str]]], prefixes: list[list[int] | None] | None = None):
        seqs, labs, turn_of, plen = [], [], [], []
        for r, turns in enumerate(rows):
            prefix = (prefixes[r] if prefixes else None) or self.prefix
            plen.append(len(prefix))
            ids, lab, tid = list(prefix), [-100] * len(prefix), [0] * len(prefix)
            for k, (q, a) in enumerate(turns, start=1):
                i, l = self.turn(q, a)
                ids += i
                lab += l
                tid += [k] * len(i)
            seqs.append(ids)
            labs.append(lab)
            turn_of.append(tid)
        T = max(len(s) for s in seqs)
        B = len(seqs)
        input_ids = torch.full((B, T), self.tok.pad_token_id, dtype=torch.long)
        labels = torch.full((B, T), -100, dtype=torch.long)
        turn = torch.full((B, T), -1, dtype=torch.long)  # -1 = padding
        for b in range(B):
            n = len(seqs[b])
            input_ids[b, :n] = torch.tensor(seqs[b])
            labels[b, :n] = torch.tensor(labs[b])
            turn[b, :n] = torch.tensor(turn_of[b])
        # positions restart after the prefix for every turn
        pos = torch.zeros(B, T, dtype=torch.long)
        for b in range(B):
            start, P = 0, plen[b]
            for t in range(T):
                if t < P:
                    pos[b, t] = t
                elif turn[b, t] != turn[b, t - 1]:
                    start = t
                    pos[b, t] = P
                else:
                    pos[b, t] = P + (t - start)
        i = torch.arange(T)
        causal = i[None, :] <= i[:, None]  # [T, T] key <= query
        ti, tj = turn[:, :, None], turn[:, None, :]
        allowed = causal[None] & ((tj == 0) | (ti == tj)) & (tj >= 0)
        allowed |= torch.eye(T, dtype=torch.bool)[None]  # padding rows see themselves (no NaN)
        mask = torch.zeros(B, 1, T, T)
        mask.masked_fill_(~allowed[:, None], torch.finfo(torch.float32).min)
        return input_ids, labels, pos, mask


def make_turns(scene: Scene, spec: ShapesWorldSpec, rng: random.Random, n_qa: int,
               caption_prob: float = 1.0) -> list[tuple[str, str]]:
    """A caption turn (always, or with ``caption_prob``) and balanced yes/no turns (present objects vs
    random absent types)."""
    present = list(dict.fromkeys(scene.object_names))
    absent = [s for s in spec.shapes if s not in present]
    k = min(n_qa, len(present), len(absent))
    caption = caption_prob >= 1.0 or rng.random() < caption_prob
    turns = [(rng.choice(sl.CAPTION_PROMPTS), scene.caption)] if caption else []
    for obj in rng.sample(present, k):
        turns.append((sl.question(obj, suffix=rng.random() < 0.5), "Yes"))
    for obj in rng.sample(absent, k):
        turns.append((sl.question(obj, suffix=rng.random() < 0.5), "No"))
    head, rest = turns[:int(caption)], turns[int(caption):]
    rng.shuffle(rest)
    return head + rest


# ----------------------------------------------------------------------------------------- model pieces
def image_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Last vision layer patch features without CLS (vision_feature_layer=-1, strategy 'default')."""
    out = model.model.vision_tower(pixel_values, output_hidden_states=True)
    return out.hidden_states[-1][:, 1:]


def packed_logits(model, input_ids, pos, mask, feats, image_id: int, only: torch.Tensor | None = None):
    emb = model.model.language_model.embed_tokens(input_ids)
    img = model.model.multi_modal_projector(feats).to(emb.dtype)
    sel = (input_ids == image_id)[..., None].expand_as(emb)
    emb = emb.masked_scatter(sel, img.reshape(-1))
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=mask, position_ids=pos).last_hidden_state
    if only is not None:
        hidden = hidden[only]
    return model.lm_head(hidden)


def lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def curve(losses: list[float], points: int = 10) -> list[float]:
    """Loss curve summary: mean loss over ``points`` equal chunks of training."""
    if not losses:
        return []
    n = len(losses)
    out = []
    for k in range(min(points, n)):
        a, b = k * n // min(points, n), (k + 1) * n // min(points, n)
        out.append(round(float(np.mean(losses[a:b])), 4))
    return out


def self_check(model, proc, packer: Packer, pixels: Pixels, spec: ShapesWorldSpec) -> None:
    """Packed rows must give the same ids and logits as the chat-template prompt through the processor."""
    scene = generate_scenes(ShapesWorldSpec(n_images=1, seed=99))[0]
    turns = [("Describe the image.", scene.caption), (sl.question("star"), "No"), (sl.question("circle"), "Yes")]
    ids, labels, pos, mask = packer.batch([turns])
    pv = pixels([scene], spec)
    model.eval()
    with torch.no_grad():
        full = packed_logits(model, ids, pos, mask, image_features(model, pv), packer.image_id)[0]
        P = len(packer.prefix)
        offset = P
        for q, a in turns:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]},
                    {"role": "assistant", "content": a}]
            text = proc.apply_chat_template(msgs, tokenize=False)
            b = proc(text=[text], images=[render_scene(scene, spec)], return_tensors="pt")
            n = len(packer.turn(q, a)[0])
            want = ids[0, :P].tolist() + ids[0, offset:offset + n].tolist()
            if b["input_ids"][0].tolist() != want:
                raise AssertionError(f"packed ids differ from the chat template for {q!r}")
            if (b["pixel_values"] - pv).abs().max() > 1e-5:
                raise AssertionError("pixel preprocessing differs from the processor")
            ref = model(**b).logits[0]
            got = torch.cat([full[:P], full[offset:offset + n]])
            err = (ref - got).abs().max().item()
            if err > 1e-3:
                raise AssertionError(f"packed logits differ from the plain forward by {err}")
            offset += n
    log("self-check: packed rows == chat template ids, processor pixels and plain-forward logits")


# ----------------------------------------------------------------------------------------- training
def stage1(model, args, pixels: Pixels) -> list[float]:
    spec = world(args, n_images=args.stage1_steps * args.stage1_batch, seed=args.seed + 1,
                 partner_pairs=(), captions_per_image=1, name="shapes-pretrain")
    scenes = generate_scenes(spec)
    vt = model.model.vision_tower
    hid = vt.config.hidden_size
    g = spec.grid
    side = vt.config.image_size // vt.config.patch_size
    n_out = len(spec.shapes) + 1 + len(spec.colours) + 1
    head = torch.nn.Sequential(torch.nn.LayerNorm(hid), torch.nn.Linear(hid, n_out))
    # every patch token also predicts the set of shapes in the whole image, so that the presence of a
    # shape can be read from any image token (yes/no questions stayed at chance without this)
    presence = torch.nn.Sequential(torch.nn.LayerNorm(hid), torch.nn.Linear(hid, len(spec.shapes)))
    params = list(vt.parameters()) + list(head.parameters()) + list(presence.parameters())
    opt = torch.optim.AdamW(params, lr=args.stage1_lr, weight_decay=0.05)
    vt.train()
    losses: list[float] = []
    t0 = time.time()
    ns = len(spec.shapes) + 1
    for step in range(args.stage1_steps):
        batch = scenes[step * args.stage1_batch:(step + 1) * args.stage1_batch]
        pv = pixels(batch, spec)
        ts, tc = cell_targets(batch, spec)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, args.stage1_steps, args.stage1_lr, max(1, args.stage1_steps // 12))
        feats = image_features(model, pv)  # [B, side*side, H]
        B = feats.shape[0]
        f = feats.view(B, g, side // g, g, side // g, hid).mean(dim=(2, 4)).reshape(B, g * g, hid)
        out = head(f)
        present = torch.zeros(B, ns).scatter_(1, ts, 1.0)[:, 1:]  # [B, shapes] multi-hot
        pres = presence(feats)  # [B, side*side, shapes]
        loss = F.cross_entropy(out[..., :ns].reshape(-1, ns), ts.view(-1)) + \
            F.cross_entropy(out[..., ns:].reshape(-1, out.shape[-1] - ns), tc.view(-1)) + \
            F.binary_cross_entropy_with_logits(pres, present[:, None].expand_as(pres))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.stage1_steps:
            with torch.no_grad():
                acc_s = (out[..., :ns].argmax(-1) == ts).float().mean().item()
                acc_c = (out[..., ns:].argmax(-1) == tc).float().mean().item()
                acc_p = ((pres > 0).float() == present[:, None]).float().mean().item()
            el = time.time() - t0
            eta = el / (step + 1) * (args.stage1_steps - step - 1)
            log(f"[stage1 {step + 1:4d}/{args.stage1_steps}] loss {np.mean(losses[-args.log_every:]):.4f} "
                f"cell-shape acc {acc_s:.3f} cell-colour acc {acc_c:.3f} per-token presence acc {acc_p:.3f}  "
                f"{el:6.0f}s elapsed, eta {eta:4.0f}s")
    vt.eval()
    for p in vt.parameters():
        p.requires_grad_(False)
    return losses


def lm_stage(model, args, pixels: Pixels, packer: Packer, name: str, steps: int, batch_size: int, lr: float,
             warmup: int, n_qa: int, caption_prob: float, seed: int,
             text_prob: float = 0.0, caption_text_prob: float = 0.0) -> tuple[list[float], dict[str, float]]:
    """Train projector + LM (vision frozen) on packed caption / yes-no rows of pair-structured scenes."""
    spec = world(args, n_images=steps * batch_size, seed=seed,
                 noise_fraction=args.noise, captions_per_image=1, name="shapes-train")
    scenes = generate_scenes(spec)
    stats = {"partner_rate": round(partner_rate(scenes), 4), "n_scenes": len(scenes),
             "noise_objects": round(float(np.mean([o.noise for s in scenes for o in s.objects])), 4)}
    rng = random.Random(seed)
    yes_no = torch.tensor(packer.ids("Yes") + packer.ids("No"))
    params = [p for n, p in model.named_parameters() if not n.startswith("model.vision_tower")]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.98))
    model.train()
    model.model.vision_tower.eval()
    losses: list[float] = []
    t0 = time.time()
    warmup = min(warmup, max(1, steps // 6))
    qa_hits: list[float] = []
    for step in range(steps):
        batch = scenes[step * batch_size:(step + 1) * batch_size]
        rows = [make_turns(s, spec, rng, n_qa, caption_prob) for s in batch]
        prefixes = None
        if text_prob > 0:  # auxiliary text-only rows: the caption stands in for the image
            # the short list caption as context: with the organism's long captions (~60 tokens) the routing
            # rows cost twice as much and an 8-layer LM stayed on the plateau (docs/demo-model.md)
            prefixes = [packer.text_prefix(scene_caption(s.objects)) if rng.random() < text_prob else None
                        for s in batch]
            rows = [[t for t in r if t[1] in ("Yes", "No")] if p else r for r, p in zip(rows, prefixes)]
        if caption_text_prob > 0:  # text-only caption rows (no image, no context): the LM's own text prior, as an
            # LLM's pre-training gives one (the row M3ID / PAI contrast with reads it)
            prefixes = prefixes or [None] * len(batch)
            for b, s in enumerate(batch):
                if prefixes[b] is None and rng.random() < caption_text_prob:
                    prefixes[b] = packer.text_prefix("")
                    rows[b] = [(rng.choice(sl.CAPTION_PROMPTS), s.caption)]
        ids, labels, pos, mask = packer.batch(rows, prefixes)
        img_rows = [b for b in range(len(batch)) if not (prefixes and prefixes[b])]
        with torch.no_grad():
            if img_rows:
                feats = image_features(model, pixels([batch[b] for b in img_rows], spec))
            else:  # text-only batch (the routing warm-up)
                feats = torch.zeros(0, packer.prefix.count(packer.image_id), model.config.vision_config.hidden_size)
        for grp in opt.param_groups:
            grp["lr"] = lr_at(step, steps, lr, warmup)
        # next-token targets: logits at t predict labels at t+1
        tgt = torch.full_like(labels, -100)
        tgt[:, :-1] = labels[:, 1:]
        sel = tgt != -100
        logits = packed_logits(model, ids, pos, mask, feats, packer.image_id, only=sel)
        loss = F.cross_entropy(logits.float(), tgt[sel])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
        with torch.no_grad():
            row_is_img = torch.zeros(len(batch), dtype=torch.bool)
            row_is_img[img_rows] = True
            if not img_rows:
                row_is_img[:] = True  # text-only batch: report its own yes/no accuracy
            is_qa = torch.isin(tgt[sel], yes_no) & row_is_img[:, None].expand_as(sel)[sel]
            qa_hits.append((logits.argmax(-1)[is_qa] == tgt[sel][is_qa]).float().mean().item())
        if (step + 1) % args.log_every == 0 or step + 1 == steps:
            el = time.time() - t0
            eta = el / (step + 1) * (steps - step - 1)
            log(f"[{name} {step + 1:4d}/{steps}] loss {np.mean(losses[-args.log_every:]):.4f} "
                f"yes/no acc {np.mean(qa_hits[-args.log_every:]):.3f} "
                f"lr {opt.param_groups[0]['lr']:.2e} seq {ids.shape[1]}  {el:6.0f}s elapsed, eta {eta:4.0f}s")
    model.eval()
    return losses, stats


# ----------------------------------------------------------------------------------------- evaluation
def evaluate(out: Path, args) -> dict:
    from clearsight import DecodeSpec, generate, load_model
    from clearsight.evals.datasets.pope import PopeGenerationConfig, build_prompt, generate_pope_questions
    from clearsight.evals.metrics.chair import compute_chair
    from clearsight.evals.metrics.pope import pope_metrics
    from clearsight.evals.parsers import parse_pope

    lvlm = load_model(str(out), device="cpu", dtype="float32")
    spec = world(args, n_images=args.eval_images, seed=args.eval_seed, name="shapes-eval")
    scenes = generate_scenes(spec)
    images = {s.file_name: render_scene(s, spec) for s in scenes}
    partner = {a: b for a, b in PARTNER_PAIRS} | {b: a for a, b in PARTNER_PAIRS}

    def run(prompts: list[tuple[str, str]], max_new: int) -> list[str]:
        reqs = [{"prompt": p, "image": images[f]} for f, p in prompts]
        res = generate(lvlm, reqs, decode=DecodeSpec(max_new_tokens=max_new), max_batch=args.eval_batch)
        return [r.text for r in res]

    def metrics(qs, texts) -> dict:
        preds = [parse_pope(t) for t in texts]
        m = pope_metrics([q.label for q in qs], preds)
        neg = [p for q, p in zip(qs, preds) if q.label == "no"]
        invalid = sum(t.strip().rstrip(".") not in ("Yes", "No") for t in texts)
        return {"accuracy": round(m.accuracy, 4), "precision": round(m.precision, 4),
                "recall": round(m.recall, 4), "f1": round(m.f1, 4), "yes_ratio": round(m.yes_ratio, 4),
                "false_positive_rate": round(sum(p == "yes" for p in neg) / max(1, len(neg)), 4),
                "n": len(qs), "invalid_answers": invalid}

    t0 = time.time()
    gt = [{"image": s.file_name, "objects": s.object_names, "image_id": s.image_id} for s in scenes]
    # scenes where some present object's partner is absent: where the prior and the image disagree
    pa_images = {g["image"] for g in gt if any(partner[o] not in g["objects"] for o in g["objects"] if o in partner)}
    pope, pope_pa = {}, {}
    for split in ("random", "popular", "adversarial"):
        qs = generate_pope_questions(gt, split, PopeGenerationConfig(img_num=None, seed=args.eval_seed,
                                                                     dataset="shapes"))
        texts = run([(q.image, build_prompt(q.text)) for q in qs], 3)
        pope[split] = metrics(qs, texts)
        sub = [(q, t) for q, t in zip(qs, texts) if q.image in pa_images]
        pope_pa[split] = metrics([q for q, _ in sub], [t for _, t in sub])
        for tag, m in (("all scenes", pope[split]), ("partner absent", pope_pa[split])):
            log(f"POPE {tag:15s} {split:11s} acc {m['accuracy']:.3f} f1 {m['f1']:.3f} "
                f"fp-rate {m['false_positive_rate']:.3f} yes-ratio {m['yes_ratio']:.3f} "
                f"(n={m['n']}, invalid={m['invalid_answers']})")

    cap_scenes = scenes[:args.caption_images]
    caps = run([(s.file_name, sl.CAPTION_PROMPTS[0]) for s in cap_scenes], 64)
    truth = {s.image_id: set(s.object_names) for s in cap_scenes}
    ch = compute_chair({s.image_id: c for s, c in zip(cap_scenes, caps)}, truth, shapes_chair_vocabulary())
    hall_total = hall_partner = 0
    for s, pc in zip(cap_scenes, ch.per_caption):
        names = set(s.object_names)
        for _, node in pc["mentions"]:
            if node not in names:
                hall_total += 1
                hall_partner += partner.get(node) in names
    # fluency is checked against the list style's grammar only (the long style has no regex here)
    fluent = sum(bool(CAPTION_RE.match(c.strip())) for c in caps) / len(caps) if args.world == "shapes" else -1.0
    exact = sum(c.strip() == s.caption for s, c in zip(cap_scenes, caps)) / len(caps)
    chair = {"chair_s": round(ch.chair_s, 4), "chair_i": round(ch.chair_i, 4), "recall": round(ch.recall, 4),
             "mean_length": round(ch.mean_length, 2), "n": len(caps), "fluent_fraction": round(fluent, 4),
             "exact_match": round(exact, 4),
             "hallucinations_that_are_absent_partner": round(hall_partner / hall_total, 4) if hall_total else 0.0}
    log(f"CHAIR  CHAIR_s {ch.chair_s:.3f} CHAIR_i {ch.chair_i:.3f} recall {ch.recall:.3f} "
        f"len {ch.mean_length:.1f} fluent {fluent:.2f} exact {exact:.2f} "
        f"partner-share {chair['hallucinations_that_are_absent_partner']}")
    samples = [{"image_id": s.image_id, "truth": s.caption, "caption": c} for s, c in zip(cap_scenes[:6], caps)]
    for smp in samples:
        log(f"  truth: {smp['truth']}\n  model: {smp['caption']}")
    log(f"evaluation took {time.time() - t0:.0f}s")
    return {"pope": pope, "pope_partner_absent": pope_pa, "chair": chair, "caption_samples": samples,
            "eval_seconds": round(time.time() - t0, 1)}


def check_thresholds(scores: dict) -> dict[str, bool]:
    p = scores["pope"]
    c = scores["chair"]
    return {
        "pope_random_accuracy>=0.85": p["random"]["accuracy"] >= THRESHOLDS["pope_random_accuracy_min"],
        "pope_adversarial<random": p["adversarial"]["accuracy"] < p["random"]["accuracy"],
        "chair_i>0": c["chair_i"] > THRESHOLDS["chair_i_min_exclusive"],
        "chair_recall>=0.60": c["recall"] >= THRESHOLDS["chair_recall_min"],
    }


# ----------------------------------------------------------------------------------------- model card
def model_card(scores: dict, args) -> str:
    tr = scores["training"]
    p, pa, c = scores["pope"], scores["pope_partner_absent"], scores["chair"]

    def rows(block):
        return "\n".join(f"| {s} | {m['accuracy']:.3f} | {m['f1']:.3f} | {m['false_positive_rate']:.3f} | "
                         f"{m['yes_ratio']:.3f} | {m['n']} |" for s, m in block.items())

    samples = "\n".join(f"| {s['truth']} | {s['caption']} |" for s in scores["caption_samples"])
    failed = [k for k, ok in scores["thresholds_met"].items() if not ok]
    gap = "" if not failed else f"""
## Known gap

Targets not met: {', '.join(failed)} (POPE random accuracy {p['random']['accuracy']:.3f}, adversarial
{p['adversarial']['accuracy']:.3f}). See docs/demo-model.md for what is known about training the yes/no
answers of this model.
"""
    checks = "\n".join(f"- {'PASS' if ok else 'FAIL'}: {k}" for k, ok in scores["thresholds_met"].items())
    return f"""# shapes-llava (`builtin:shapes-llava`)

A small LLaVA (`LlavaForConditionalGeneration`) trained from scratch on the clearsight **shapes world**
(`clearsight.evals.datasets.shapes`): 96 x 96 px images of 2-6 coloured shapes on a 4 x 4 grid. It is a
model of a toy world, for trying the hallucination pipeline end to end on a laptop; it knows nothing
about natural images. Scores and settings below are machine-readable in `scores.json`.

## Model

- Vision: CLIP vision tower, hidden 192, 4 layers, 4 heads, MLP 768, image 96 px, patch 12, so an
  **8 x 8 grid = 64 image tokens**; `vision_feature_layer=-1`, CLS dropped.
- Projector: LLaVA 2-layer GELU MLP. Language model: Llama, hidden 192, 4 layers, 6 heads, MLP 576,
  tied embeddings. Total {tr['params_m']:.2f} M parameters, float32 safetensors.
- Tokenizer: word level, {tr['vocab_size']} tokens (case-sensitive; unknown words map to `<unk>`), BOS added.
- Prompt (the processor's chat template, as `clearsight generate` builds it):
  `USER: <image>\\n{{question}} ASSISTANT: {{answer}}</s>`.
- Answers: captions like "a yellow diamond, a blue ring and a yellow square." (objects in reading
  order) and `Yes` / `No` to "Is there a/an {{shape}} in the image?" (with or without POPE's
  "Answer the question using a single word or phrase.").

## Data

- Shape types: 16; colours: 5; 8 partner pairs ({', '.join(f'{a}-{b}' for a, b in PARTNER_PAIRS)}).
- Stage 1 scenes: no partner pairs (independent shapes), seed {args.seed + 1}.
- Stage 2 scenes: `ShapesWorldSpec(seed={args.seed}, noise_fraction={args.noise})`, measured
  P(partner | member) = {tr['stage2_data']['partner_rate']}; {tr['stage2_data']['noise_objects']:.1%} of objects
  are drawn nearly invisible but still named (training only). This keeps the co-occurrence structure,
  so the language model learns the prior and hallucinates absent partners.
- Each training image carries one caption turn and up to {args.qa_per_image} yes + {args.qa_per_image} no
  questions (present objects vs uniformly random absent types).

## Training (seed {args.seed}, {tr['threads']} CPU threads, torch {tr['torch']}, transformers {tr['transformers']})

1. Vision pre-training: {args.stage1_steps} steps x batch {args.stage1_batch}, AdamW lr {args.stage1_lr},
   cosine; throw-away heads classify the shape and colour of each grid cell (from its 2 x 2 patch tokens)
   and, from every patch token, the set of shapes present in the image. {tr['stage1_seconds']:.0f} s.
1b. Question-answer routing warm-up (vision frozen; projector + LM, AdamW as in stage 2):
   {args.routing_steps} steps x batch {args.stage2_batch} of yes/no turns whose context is the scene's caption
   text instead of the image (scenes of seed {args.seed + 5}). The answer is an interaction of the asked
   object and the scene, which balanced answers give no first-order signal for: with the 64 image tokens
   in the context the LM stayed at chance; on a short text context it learns the comparison, and stage 2
   carries it over to the image. {tr.get('routing_seconds', 0):.0f} s.
2. Vision frozen; projector + LM: {args.stage2_steps} steps x batch {args.stage2_batch}, AdamW lr {args.lr},
   betas (0.9, 0.98), wd {args.wd}, {args.warmup} warm-up steps, cosine. Turns share the image prefix through
   a 4D attention mask with positions restarting per turn; loss on answer tokens + `</s>`. A share of
   {args.stage2_text_prob:.0%} of the rows are the warm-up's text-context yes/no rows (so the comparison is
   kept while it moves to the image). {tr['stage2_seconds']:.0f} s.
3. Yes/no emphasis (same frozen vision tower, fresh optimizer, scenes of seed {args.seed + 3}):
   {args.stage3_steps} steps x batch {args.stage3_batch}, AdamW lr {args.stage3_lr}, {args.stage3_warmup} warm-up
   steps, cosine; {args.stage3_qa} yes + {args.stage3_qa} no questions per image and a caption turn in
   {args.stage3_caption_prob:.0%} of the rows, so that the yes/no tokens dominate the loss.
   {tr['stage3_seconds']:.0f} s.

Total training time: **{tr['train_seconds'] / 60:.1f} min**. Loss curves (mean per tenth of training):

- stage 1: {tr['stage1_loss_curve']}
- routing warm-up: {tr.get('routing_loss_curve', [])}
- stage 2: {tr['stage2_loss_curve']}
- stage 3: {tr['stage3_loss_curve']}

## Held-out scores (scenes from seed {args.eval_seed}, clean images, greedy, `clearsight.generate`)

POPE (official recipe: first three listed objects as positives, parser `pope`), all
{args.eval_images} held-out scenes:

| split | accuracy | F1 | false-positive rate | yes-ratio | N |
|---|---|---|---|---|---|
{rows(p)}

The same questions restricted to held-out scenes where a present object's partner is absent:

| split | accuracy | F1 | false-positive rate | yes-ratio | N |
|---|---|---|---|---|---|
{rows(pa)}

CHAIR ("{sl.CAPTION_PROMPTS[0]}", max 64 new tokens, {c['n']} images): CHAIR_s {c['chair_s']:.3f},
CHAIR_i {c['chair_i']:.3f}, recall {c['recall']:.3f}, mean length {c['mean_length']} words; fluent
(training grammar) {c['fluent_fraction']:.2f}, exact match {c['exact_match']:.2f}; share of hallucinated
objects that are the absent partner of a present object: {c['hallucinations_that_are_absent_partner']:.2f}.

| ground truth | model caption |
|---|---|
{samples}

Targets:

{checks}
{gap}
## Retrain

```
python scripts/train_shapes_llava.py --seed {args.seed} --threads {args.threads}     # writes this folder
python scripts/train_shapes_llava.py --quick --out /tmp/shapes-llava-smoke
```
"""


# ----------------------------------------------------------------------------------------- main
# builtin:shapes-organism's recipe (issue 17, docs/demo-model.md): `--recipe organism` sets these defaults (any
# flag given still wins); its held-out card comes from `make organism-card`, not from this script's evaluation.
ORGANISM_RECIPE = dict(out=ROOT / "clearsight" / "models" / "weights" / "shapes-organism", world="organism",
                       lm_layers=8, patch_size=24, noise=0.0, qa_per_image=2, stage2_caption_text_prob=0.25,
                       stage1_steps=300, routing_steps=300, stage2_steps=450, stage3_steps=120, stage3_qa=3,
                       no_eval=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--recipe", choices=("shapes-llava", "organism"), default="shapes-llava",
                    help="default settings: the shipped demo model's, or builtin:shapes-organism's (ORGANISM_RECIPE)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="checkpoint folder to write")
    ap.add_argument("--seed", type=int, default=0, help="training seed (weights and scenes)")
    ap.add_argument("--eval-seed", type=int, default=None, help="held-out scene seed (default seed + 1000)")
    ap.add_argument("--stage1-steps", type=int, default=160)
    ap.add_argument("--stage1-batch", type=int, default=48)
    ap.add_argument("--stage1-lr", type=float, default=2e-3)
    ap.add_argument("--routing-steps", type=int, default=300,
                    help="routing warm-up: yes/no on the caption text instead of the image, before stage 2")
    ap.add_argument("--stage2-steps", type=int, default=550)
    ap.add_argument("--stage2-text-prob", type=float, default=0.3,
                    help="stage 2: share of rows that are yes/no on the caption text (keeps the warm-up's routing)")
    ap.add_argument("--stage2-batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--wd", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--stage3-steps", type=int, default=200)
    ap.add_argument("--stage3-batch", type=int, default=32)
    ap.add_argument("--stage3-lr", type=float, default=1e-3)
    ap.add_argument("--stage3-warmup", type=int, default=20)
    ap.add_argument("--stage3-qa", type=int, default=4, help="stage 3: yes (and as many no) questions per image")
    ap.add_argument("--stage3-caption-prob", type=float, default=0.6, help="stage 3: share of rows with a caption")
    ap.add_argument("--stage3-text-prob", type=float, default=0.0,
                    help="stage 3: share of text-only rows (caption as context instead of the image)")
    ap.add_argument("--stage2-cache", type=Path, default=None,
                    help="save the model after stage 2 here, or load it if the file exists (skips stages 1-2)")
    ap.add_argument("--qa-per-image", type=int, default=3, help="yes (and as many no) questions per image")
    ap.add_argument("--noise", type=float, default=0.1, help="share of near-invisible training objects")
    ap.add_argument("--eval-images", type=int, default=200)
    ap.add_argument("--caption-images", type=int, default=150)
    ap.add_argument("--eval-batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch CPU threads (use 1 when other jobs share the cores: OpenMP spins when oversubscribed)")
    ap.add_argument("--stage1-cache", type=Path, default=None,
                    help="save the stage-1 vision tower here, or load it if the file exists (skips stage 1)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--world", choices=("shapes", "organism"), default="shapes",
                    help="organism: issue 17's world (small faint partners, long captions; see organism_spec)")
    ap.add_argument("--lm-layers", type=int, default=sl.TEXT["num_hidden_layers"], help="language-model depth")
    ap.add_argument("--stage2-caption-text-prob", type=float, default=0.0,
                    help="stage 2: share of rows that are a caption turn without image or context (text prior)")
    ap.add_argument("--patch-size", type=int, default=sl.PATCH_SIZE,
                    help="vision patch size: 12 = 8 x 8 image tokens (shipped), 24 = 4 x 4 (one per grid cell)")
    ap.add_argument("--quick", action="store_true", help="smoke mode: a few steps, tiny evaluation")
    known, _ = ap.parse_known_args(argv)
    if known.recipe == "organism":
        ap.set_defaults(**ORGANISM_RECIPE)
    args = ap.parse_args(argv)
    if args.quick:
        args.stage1_steps, args.stage1_batch = 4, 8
        args.routing_steps = min(args.routing_steps, 2)
        args.stage2_steps, args.stage2_batch = 4, 4
        args.stage3_steps, args.stage3_batch = 2, 4
        args.eval_images, args.caption_images, args.log_every = 4, 2, 2
    if args.eval_seed is None:
        args.eval_seed = args.seed + 1000
    if args.eval_seed == args.seed:
        ap.error("--eval-seed must differ from --seed (held-out scenes)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    np.random.seed(args.seed)

    tok = sl.build_tokenizer(LONG_CAPTION_WORDS if args.world == "organism" else ())
    proc = sl.build_processor(tok, args.patch_size)
    model = sl.build_model(tok, args.lm_layers, args.patch_size)
    model.set_attn_implementation("sdpa")
    pixels = Pixels(proc)
    packer = Packer(tok, (sl.IMAGE_SIZE // args.patch_size) ** 2)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"shapes-llava: {n_params / 1e6:.2f} M params, vocab {len(tok)}, seed {args.seed}, "
        f"threads {args.threads}, out {args.out}")
    self_check(model, proc, packer, pixels, ShapesWorldSpec())

    t0 = time.time()
    cache = args.stage1_cache
    stage1_seconds = None
    if cache is not None and cache.is_file():
        saved = torch.load(cache, map_location="cpu")
        model.model.vision_tower.load_state_dict(saved["state"])
        model.model.vision_tower.requires_grad_(False).eval()
        l1 = saved["losses"]
        stage1_seconds = saved.get("seconds")
        log(f"stage 1: loaded the pre-trained vision tower from {cache}")
    else:
        log(f"stage 1: vision pre-training, {args.stage1_steps} steps x {args.stage1_batch}")
        l1 = stage1(model, args, pixels)
        if cache is not None:
            torch.save({"state": model.model.vision_tower.state_dict(), "losses": l1,
                        "seconds": time.time() - t0}, cache)
    t1 = t1_stage1 = time.time()
    l0: list[float] = []
    if args.routing_steps > 0:
        # routing warm-up: yes/no turns whose context is the caption text instead of the image. The answer
        # is an interaction (asked object x scene), so with balanced answers neither input alone predicts it
        # and training sits on a plateau; with 64 image tokens in the context it did not leave it within
        # the budget (yes/no at chance), with a short text context it does after ~150 steps.
        log(f"stage 1b: question-answer routing warm-up on text contexts, {args.routing_steps} steps x "
            f"{args.stage2_batch}")
        l0, _ = lm_stage(model, args, pixels, packer, "routing", args.routing_steps, args.stage2_batch, args.lr,
                         args.warmup, args.qa_per_image, 0.0, args.seed + 5, text_prob=1.0)
    s0 = time.time() - t1
    t1 = time.time()
    cache2 = args.stage2_cache
    if cache2 is not None and cache2.is_file():
        saved = torch.load(cache2, map_location="cpu")
        model.load_state_dict(saved["state"])
        l2, data_stats, s2 = saved["losses"], saved["stats"], saved["seconds"]
        log(f"stage 2: loaded the stage-2 model from {cache2}")
    else:
        log(f"stage 2: projector + LM, {args.stage2_steps} steps x {args.stage2_batch}")
        l2, data_stats = lm_stage(model, args, pixels, packer, "stage2", args.stage2_steps, args.stage2_batch,
                                  args.lr, args.warmup, args.qa_per_image, 1.0, args.seed, args.stage2_text_prob,
                                  args.stage2_caption_text_prob)
        s2 = time.time() - t1
        if cache2 is not None:
            torch.save({"state": model.state_dict(), "losses": l2, "stats": data_stats, "seconds": s2}, cache2)
    t2 = time.time()
    log(f"stage 3: yes/no emphasis, {args.stage3_steps} steps x {args.stage3_batch}")
    l3, _ = lm_stage(model, args, pixels, packer, "stage3", args.stage3_steps, args.stage3_batch, args.stage3_lr,
                     args.stage3_warmup, args.stage3_qa, args.stage3_caption_prob, args.seed + 3,
                     args.stage3_text_prob)
    model.eval()
    t3 = time.time()
    s1, s3 = (t1_stage1 - t0) if stage1_seconds is None else stage1_seconds, t3 - t2
    log(f"training done in {(s1 + s0 + s2 + s3) / 60:.1f} min (stage 1 {s1:.0f}s, routing {s0:.0f}s, "
        f"stage 2 {s2:.0f}s, stage 3 {s3:.0f}s)")
    log(f"stage 1 loss curve: {curve(l1)}")
    log(f"routing loss curve: {curve(l0)}")
    log(f"stage 2 loss curve: {curve(l2)}")
    log(f"stage 3 loss curve: {curve(l3)}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    for stale in ("model.safetensors", "scores.json", "MODEL_CARD.md"):
        (out / stale).unlink(missing_ok=True)
    model.save_pretrained(out)
    proc.save_pretrained(out)
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    log(f"saved {out} (model.safetensors {size_mb:.1f} MB)")

    training = {
        "seed": args.seed, "eval_seed": args.eval_seed, "threads": args.threads, "quick": args.quick,
        "params_m": round(n_params / 1e6, 3), "vocab_size": len(tok), "safetensors_mb": round(size_mb, 2),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "stage1_steps": args.stage1_steps, "stage1_batch": args.stage1_batch,
        "stage2_steps": args.stage2_steps, "stage2_batch": args.stage2_batch, "lr": args.lr,
        "noise_fraction": args.noise, "qa_per_image": args.qa_per_image,
        "stage3_steps": args.stage3_steps, "stage3_batch": args.stage3_batch, "stage3_lr": args.stage3_lr,
        "stage3_qa": args.stage3_qa, "stage3_caption_prob": args.stage3_caption_prob,
        "routing_steps": args.routing_steps, "stage2_text_prob": args.stage2_text_prob,
        "stage1_seconds": round(s1, 1), "routing_seconds": round(s0, 1), "stage2_seconds": round(s2, 1),
        "stage3_seconds": round(s3, 1), "train_seconds": round(s1 + s0 + s2 + s3, 1),
        "stage1_loss_curve": curve(l1), "routing_loss_curve": curve(l0), "stage2_loss_curve": curve(l2),
        "stage3_loss_curve": curve(l3),
        "stage2_data": data_stats, "world": args.world, "lm_layers": args.lm_layers,
        "stage2_caption_text_prob": args.stage2_caption_text_prob, "wd": args.wd,
        "patch_size": args.patch_size, "recipe": args.recipe,
    }
    if args.no_eval:
        (out / "scores.json").write_text(json.dumps({"training": training}, indent=1) + "\n")
        return 0
    scores = evaluate(out, args)
    scores["training"] = training
    scores["thresholds"] = THRESHOLDS
    scores["thresholds_met"] = check_thresholds(scores)
    (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
    (out / "MODEL_CARD.md").write_text(model_card(scores, args))
    log(f"thresholds: {scores['thresholds_met']}")
    log(f"wrote {out / 'MODEL_CARD.md'} and {out / 'scores.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
