"""The GPU suite: one command that measures clearsight at 7B shapes, side by side, in under 8 minutes.

No download: random-weight models are built from LLaVA-1.5-7B's and Qwen2-VL-7B's configs (written out
below) in bf16 on the GPU, with word-level tokenizers of the same vocabulary size. Parts, each with its own
time budget (seconds on one H100 / H200; a measurement that would not fit is skipped and printed as such):

1. ``kernels``  (90 s): ``attention_kernels.py`` trimmed (batch 1 and 8, prefill 1280 / 2560, decode 2048,
   five edit kinds, no FlexAttention), run as a subprocess and killed at its budget;
2. per model (``llava-7b``, ``qwen2-vl-7b``; 150 s each):
   - ``throughput``: prefill and decode tokens/s at batch 1, 8, 32 for stock transformers SDPA vs the
     ``torch`` vs the ``triton`` backend, every plan empty (ratios against SDPA);
   - ``mitigations``: each plan mitigation's decode tokens/s at batch 8 on triton and torch, against
     the unmitigated run of the same backend;
   - ``branches``: each branch method's decode step time at batch 1 against unmitigated;
   - ``compiled``: the compiled decode step (static cache, CUDA graphs) vs the eager step at batch 1 and 8,
     with batch 1's milliseconds a token against the weight-bandwidth limit (weights bytes / peak bandwidth);
3. ``engine`` (60 s): the Engine under a burst of requests (a mix of none / pai / vcd), tokens/s and latency.

Peak GPU memory is recorded per part. Every table is printed as it is measured and the JSON file is rewritten
after every row, so a run cut short still leaves its figures. ``--smoke`` runs every path at tiny shapes on
the CPU (the Triton interpreter for the triton backend; the compiled step with ``aot_eager``, since inductor's
CPU code generation takes minutes) and exits non-zero if any path fails: CI runs it.

    python benchmarks/gpu_suite.py --out gpu_suite.json          # the GPU run (< 8 min on an H200)
    python benchmarks/gpu_suite.py --parts llava-7b --budget-scale 0.5
    python benchmarks/gpu_suite.py --smoke                       # CPU, tiny shapes (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PARTS = ("kernels", "llava-7b", "qwen2-vl-7b", "engine")
BUDGET_S = {"kernels": 90.0, "llava-7b": 150.0, "qwen2-vl-7b": 150.0, "engine": 60.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (CI): every path, no figures")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", default="gpu_suite.json", help="the JSON file (rewritten after every row)")
    p.add_argument("--budget-scale", type=float, default=1.0, help="multiply every part's time budget")
    p.add_argument("--new-tokens", type=int, default=None, help="decode steps per run (default 32; smoke 3)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
if ARGS.smoke:  # before triton is imported: the triton backend runs under its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

import clearsight.decoding.compiled as compiled  # noqa: E402
from clearsight import DecodeSpec, generate  # noqa: E402
from clearsight.config import ModelSpec  # noqa: E402
from clearsight.engine import Engine  # noqa: E402
from clearsight.mitigations.registry import REGISTRY  # noqa: E402
from clearsight.models.adapters import adapter_for  # noqa: E402
from clearsight.models.builtin import LLAVA_TEMPLATE, QWEN_TEMPLATE, TINY_WORDS  # noqa: E402
from clearsight.models.loader import LVLM  # noqa: E402
from clearsight.models.processors import ImageOnlyQwen2VLProcessor  # noqa: E402
from clearsight.models.tokenizer import LLAVA_SPECIALS, QWEN_SPECIALS, word_level_tokenizer  # noqa: E402

# ---------------------------------------------------------------------------------------------- model configs
# LLaVA-1.5-7B (llava-hf/llava-1.5-7b-hf): Vicuna-7B (Llama) + CLIP ViT-L/14 at 336 px, 576 image tokens
LLAVA_7B = dict(
    text=dict(model_type="llama", vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5),
    vision=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768),
    image_size=336,
)
# Qwen2-VL-7B-Instruct: Qwen2-7B (GQA 28 / 4 heads, M-RoPE) + a 32-block ViT, 2x2 patch merge
QWEN2_VL_7B = dict(
    text=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
              num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768, rms_norm_eps=1e-6,
              rope_theta=1000000.0, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision=dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
    image_size=448,  # 32 x 32 patches, merged 2 x 2: 256 image tokens
)
# the smoke run's shapes: the same classes and code paths, a few thousand parameters
TINY_LLAVA = dict(
    text=dict(LLAVA_7B["text"], vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4),
    vision=dict(LLAVA_7B["vision"], hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8, projection_dim=32),
    image_size=32,
)
TINY_QWEN = dict(
    text=dict(QWEN2_VL_7B["text"], vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
    vision=dict(QWEN2_VL_7B["vision"], depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2),
    image_size=56,
)


def _tokenizer(vocab: int, specials: tuple[str, ...], image_token: str, bos: str | None, eos: str):
    """A word-level tokenizer with exactly ``vocab`` ids (the model's), so every generated id decodes."""
    words = list(TINY_WORDS)
    tok = word_level_tokenizer(words, specials, image_token=image_token, bos=bos, eos=eos)
    filler = [f"w{i}" for i in range(vocab - len(tok))]
    return word_level_tokenizer(words + filler, specials, image_token=image_token, bos=bos, eos=eos)


def build(family: str, shapes: dict[str, Any], device: str, dtype: torch.dtype) -> LVLM:
    """A random-weight model of ``family`` (llava | qwen2-vl) at ``shapes``, built on ``device`` directly."""
    text, size = dict(shapes["text"]), shapes["image_size"]
    if family == "llava":
        tok = _tokenizer(text["vocab_size"], LLAVA_SPECIALS, "<image>", "<s>", "</s>")
        patch = shapes["vision"]["patch_size"]
        ip = CLIPImageProcessorPil(size={"height": size, "width": size}, do_center_crop=False)
        proc = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=LLAVA_TEMPLATE)
        cfg = LlavaConfig(vision_config=shapes["vision"], text_config=text,
                          image_token_index=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
                          vision_feature_select_strategy="default", image_seq_length=(size // patch) ** 2,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        cls: Any = LlavaForConditionalGeneration
    else:
        tok = _tokenizer(text["vocab_size"], QWEN_SPECIALS, "<|image_pad|>", None, "<|im_end|>")
        ip = Qwen2VLImageProcessorPil(min_pixels=size * size, max_pixels=size * size, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
        proc = ImageOnlyQwen2VLProcessor(image_processor=ip, tokenizer=tok, chat_template=QWEN_TEMPLATE)
        text.update(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        cfg = Qwen2VLConfig(vision_config=shapes["vision"], text_config=text,
                            image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                            video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                            vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                            vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
        cls = Qwen2VLForConditionalGeneration
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in the model's dtype, on the device: no 28 GB detour
    try:
        with torch.random.fork_rng(), torch.device(device):
            torch.manual_seed(0)
            model = cls(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    lvlm = LVLM(model=model, processor=proc, adapter=adapter_for(model, proc),
                spec=ModelSpec(source=f"bench:{family}-h{text['hidden_size']}", device=device))
    lvlm.set_backend("torch")
    return lvlm


# ---------------------------------------------------------------------------------------------- bookkeeping
class Suite:
    """Results (one JSON document, rewritten after every row), budgets and printing."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.out = args, Path(args.out)
        self.doc: dict[str, Any] = {"machine": machine_info(), "smoke": args.smoke, "parts": {}, "skipped": [],
                                    "failed": []}
        self.deadline = 0.0
        self.part = ""

    def start(self, part: str) -> None:
        self.part = part
        self.deadline = time.perf_counter() + BUDGET_S.get(part.split(":")[0], 60.0) * self.args.budget_scale
        self.doc["parts"].setdefault(part, {"rows": []})
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        print(f"\n== {part} (budget {self.deadline - time.perf_counter():.0f} s)", flush=True)

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def fits(self, what: str, cost: float) -> bool:
        """Whether ``cost`` seconds fit in the part's budget; if not, the row is recorded as skipped."""
        if self.args.smoke or cost < self.left():
            return True
        self.doc["skipped"].append(f"{self.part}: {what} (needs ~{cost:.0f} s, {max(self.left(), 0):.0f} s left)")
        print(f"  skipped {what}: needs ~{cost:.0f} s, {max(self.left(), 0):.0f} s left in the budget", flush=True)
        self.save()
        return False

    def row(self, **fields: Any) -> None:
        self.doc["parts"][self.part]["rows"].append(fields)
        self.save()

    def fail(self, what: str, exc: BaseException) -> None:
        line = f"{self.part}: {what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        self.doc["failed"].append(line)
        print("  FAILED " + line, flush=True)
        if self.args.smoke:
            traceback.print_exc()
        self.save()

    def end(self) -> None:
        part = self.doc["parts"][self.part]
        if torch.cuda.is_available():
            part["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
            print(f"  peak GPU memory: {part['peak_gpu_mib']:.0f} MiB", flush=True)
        self.save()

    def save(self) -> None:
        self.out.write_text(json.dumps(self.doc, indent=1, default=str))


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    try:
        import transformers
        import triton

        info["triton"], info["transformers"] = triton.__version__, transformers.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            info["driver"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def peak_bandwidth() -> float | None:
    """Nominal HBM bandwidth (bytes/s) of the GPUs the targets name; None for others."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, bw in (("H200", 4.8e12), ("H100", 3.35e12)):
        if key in name:
            return bw
    return None


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:5.2f}x" if a and b else "  n/a"


# ---------------------------------------------------------------------------------------------- parts
def part_kernels(suite: Suite) -> None:
    """attention_kernels.py, trimmed, in a subprocess killed at the part's budget (its lines stream through)."""
    script = Path(__file__).with_name("attention_kernels.py")
    if suite.args.smoke:
        # every launch path at tiny shapes, ours vs flex vs eager (tests/test_gpu_suite.py checks its output)
        cmd = [sys.executable, str(script), "--smoke", "--edits", "var", "cf_shuffled", "cca_mask"]
    elif not torch.cuda.is_available():
        print("  no CUDA GPU: the kernels part runs on GPUs only (--smoke runs its CPU path)")
        suite.row(skipped="no CUDA GPU")
        return
    else:
        cmd = [sys.executable, str(script), "--batch", "1", "8", "--prefill", "1280", "2560", "--decode", "2048",
               "--edits", "empty", "bias", "var", "cf_random", "stats", "--warmup", "3", "--iters", "10",
               "--no-flex"]
    lines: list[str] = []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    try:
        for line in proc.stdout:  # a line at a time: partial tables survive the budget's kill
            print("  " + line.rstrip(), flush=True)
            lines.append(line.rstrip())
            if suite.left() < 0 and not suite.args.smoke:
                proc.kill()
                suite.doc["skipped"].append("kernels: the rest of the grid (budget)")
                break
    finally:
        rc = proc.wait()
    suite.row(command=" ".join(cmd[1:]), returncode=rc, output=lines)
    if rc != 0 and suite.left() >= 0:
        suite.fail("attention_kernels.py", RuntimeError(f"exit status {rc}"))


def requests_for(lvlm: LVLM, n: int, size: int) -> list[dict[str, Any]]:
    img = Image.new("RGB", (size, size), (200, 30, 30))
    return [{"prompt": f"describe the image in detail please {i}", "image": img} for i in range(n)]


def run_generate(lvlm: LVLM, reqs: list[dict[str, Any]], mitigations: list[str], new_tokens: int,
                 compile: bool = False) -> dict[str, float]:
    """One generate() call with every request in one batch: prefill and decode tokens/s, decode ms/step."""
    decode = DecodeSpec(max_new_tokens=new_tokens, ignore_eos=True)
    sync()
    t0 = time.perf_counter()
    results = generate(lvlm, reqs, mitigations, decode=decode, max_batch=len(reqs), compile=compile)
    sync()
    wall = time.perf_counter() - t0
    r = results[0]
    prompt = len(lvlm.adapter.encode([lvlm.adapter.chat_prompt(reqs[0]["prompt"], True)],
                                     [reqs[0]["image"]])["input_ids"][0])
    steps = max(len(r.token_ids) - 1, 1)
    decode_s = max(x.timings["decode_s"] for x in results)
    return {"prefill_tok_s": len(reqs) * prompt / r.timings["prefill_s"],
            "decode_tok_s": len(reqs) * steps / decode_s, "step_ms": 1e3 * decode_s / steps, "wall_s": wall,
            "prompt_tokens": prompt, "decode_step": r.decode_step or "eager"}


def measure(suite: Suite, what: str, fn, estimate: float, repeats: int) -> dict[str, float] | None:
    """Median of ``repeats`` runs of ``fn`` (after one warm-up), or None when skipped / failed."""
    if not suite.fits(what, estimate * (repeats + 1)):
        return None
    try:
        if not suite.args.smoke:
            fn()  # warm-up: kernels' autotuning, compiles, allocator
        runs = [fn() for _ in range(repeats)]
    except Exception as exc:  # one failed path must not cost the rest of the figures
        suite.fail(what, exc)
        return None
    runs.sort(key=lambda m: m["decode_tok_s"])
    return runs[len(runs) // 2]


def part_model(suite: Suite, name: str) -> None:
    smoke = suite.args.smoke
    family = "llava" if name.startswith("llava") else "qwen2-vl"
    shapes = (TINY_LLAVA if family == "llava" else TINY_QWEN) if smoke else (LLAVA_7B if family == "llava"
                                                                            else QWEN2_VL_7B)
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if device == "cpu" and not smoke:
        print("  no CUDA GPU: 7B shapes are measured on GPUs only (--smoke runs every path at tiny shapes)")
        suite.row(skipped="no CUDA GPU")
        return
    t0 = time.perf_counter()
    lvlm = build(family, shapes, device, dtype)
    weights = sum(p.numel() * p.element_size() for p in lvlm.model.parameters())
    lm_weights = sum(p.numel() * p.element_size() for n, p in lvlm.model.named_parameters()
                     if "vision" not in n and "visual" not in n)
    suite.doc["parts"][name].update(weights_gb=weights / 1e9, language_weights_gb=lm_weights / 1e9,
                                    build_s=time.perf_counter() - t0)
    print(f"  built in {time.perf_counter() - t0:.1f} s: {weights / 1e9:.2f} GB of weights "
          f"({lm_weights / 1e9:.2f} GB language model)", flush=True)
    size = shapes["image_size"]
    new = suite.args.new_tokens or (2 if smoke else 32)
    batches = (1, 2) if smoke else (1, 8, 32)
    backends = ["sdpa", "torch", "triton"]
    # the smoke run takes each path once: the triton interpreter costs seconds a step, so triton runs at batch 1
    # of the first family only; the second family runs the throughput table at batch 1 only
    light = smoke and family != "llava"
    if light:
        batches, backends = (1,), ["sdpa", "torch"]
    repeats = 1 if smoke else 2
    estimate = 1.0 if smoke else 4.0  # seconds per run at batch 8, re-estimated from each measurement

    # throughput: every plan empty
    print(f"  {'batch':>5} {'backend':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/step':>8} "
          f"{'prefill vs sdpa':>15} {'decode vs sdpa':>14}", flush=True)
    base: dict[int, dict[str, float]] = {}
    for B in batches:
        reqs = requests_for(lvlm, B, size)
        for backend in backends:
            if smoke and backend == "triton" and B > 1:
                continue
            lvlm.set_backend(backend)
            m = measure(suite, f"throughput b={B} {backend}", lambda reqs=reqs: run_generate(lvlm, reqs, [], new),
                        estimate * max(B, 8) / 8, repeats)
            if m is None:
                continue
            estimate = max(m["wall_s"] * 8 / max(B, 8), 0.1)
            if backend == "sdpa":
                base[B] = m
            ref = base.get(B, {})
            print(f"  {B:>5} {backend:>7} {m['prefill_tok_s']:>14.0f} {m['decode_tok_s']:>13.1f} "
                  f"{m['step_ms']:>8.2f} {ratio(m['prefill_tok_s'], ref.get('prefill_tok_s')):>15} "
                  f"{ratio(m['decode_tok_s'], ref.get('decode_tok_s')):>14}", flush=True)
            suite.row(table="throughput", batch=B, backend=backend, **m)

    if light:
        return
    # single-pass (plan) mitigations at batch 8 (smoke: 2), against unmitigated on the same backend
    B = batches[1]
    reqs = requests_for(lvlm, B, size)
    plan_methods = sorted(k for k, c in REGISTRY.items() if c.kind == "plan")
    print(f"\n  plan mitigations, batch {B}: decode tok/s against unmitigated on the same backend", flush=True)
    for backend in ("torch",) if smoke else ("triton", "torch"):
        lvlm.set_backend(backend)
        ref = measure(suite, f"mitigations {backend} none", lambda: run_generate(lvlm, reqs, [], new), estimate, 1)
        for method in plan_methods:
            m = measure(suite, f"mitigations {backend} {method}",
                        lambda method=method: run_generate(lvlm, reqs, [method], new), estimate * 1.5, 1)
            if m is None or ref is None:
                continue
            print(f"  {backend:>7} {method:>11} {m['decode_tok_s']:>10.1f} tok/s "
                  f"{ratio(m['decode_tok_s'], ref['decode_tok_s'])}  prefill "
                  f"{ratio(m['prefill_tok_s'], ref['prefill_tok_s'])}", flush=True)
            suite.row(table="mitigations", batch=B, backend=backend, method=method, **m,
                      decode_vs_none=m["decode_tok_s"] / ref["decode_tok_s"])

    # branch methods at batch 1: step time against unmitigated
    branch_backend = "torch" if smoke else "triton"
    lvlm.set_backend(branch_backend)
    reqs = requests_for(lvlm, 1, size)
    ref = measure(suite, "branches none", lambda: run_generate(lvlm, reqs, [], new), estimate / 4, repeats)
    print(f"\n  branch methods, batch 1: decode step time against unmitigated ({branch_backend})", flush=True)
    for method in sorted(k for k, c in REGISTRY.items() if c.kind == "branch"):
        m = measure(suite, f"branches {method}", lambda method=method: run_generate(lvlm, reqs, [method], new),
                    estimate / 2, repeats)
        if m is None or ref is None:
            continue
        print(f"  {method:>9} {m['step_ms']:>8.2f} ms/step  {ratio(m['step_ms'], ref['step_ms'])} of unmitigated",
              flush=True)
        suite.row(table="branches", method=method, **m, step_vs_none=m["step_ms"] / ref["step_ms"])

    # the compiled decode step against the eager one (torch backend: the one it captures)
    part_compiled(suite, lvlm, size, new, (1,) if smoke else (1, batches[1]), estimate, lm_weights)


def part_compiled(suite: Suite, lvlm: LVLM, size: int, new: int, batches: tuple[int, ...], estimate: float,
                  lm_weights: int) -> None:
    print("\n  compiled decode step (static cache; CUDA graphs on a GPU) against the eager step, torch backend",
          flush=True)
    lvlm.set_backend("torch")
    bw = peak_bandwidth()
    for B in batches:
        reqs = requests_for(lvlm, B, size)
        for mitigations in ([], ["mma"]):
            label = "+".join(mitigations) or "none"
            eager = measure(suite, f"compiled b={B} {label} eager",
                            lambda reqs=reqs, m=mitigations: run_generate(lvlm, reqs, m, new), estimate, 2)
            # the first compiled run traces and compiles (tens of seconds at 7B): its budget is counted in
            comp = measure(suite, f"compiled b={B} {label} compiled",
                           lambda reqs=reqs, m=mitigations: run_generate(lvlm, reqs, m, new, compile=True),
                           estimate + 20, 2)
            if eager is None or comp is None:
                continue
            limit = f", weight-bandwidth limit {1e3 * lm_weights / bw:.2f} ms" if bw and B == 1 else ""
            print(f"  b={B:<3} {label:>5} eager {eager['step_ms']:8.2f} ms/step  compiled {comp['step_ms']:8.2f} "
                  f"ms/step ({comp['decode_step']})  {ratio(eager['step_ms'], comp['step_ms'])} faster{limit}",
                  flush=True)
            suite.row(table="compiled", batch=B, mitigations=label, eager_step_ms=eager["step_ms"],
                      compiled_step_ms=comp["step_ms"], decode_step=comp["decode_step"],
                      bandwidth_limit_ms=(1e3 * lm_weights / bw) if bw and B == 1 else None)
            if not comp["decode_step"].startswith("compiled"):
                suite.fail(f"compiled b={B} {label}", RuntimeError(f"ran {comp['decode_step']}"))


def part_engine(suite: Suite) -> None:
    smoke = suite.args.smoke
    device = "cuda" if torch.cuda.is_available() and not smoke else "cpu"
    if device == "cpu" and not smoke:
        print("  no CUDA GPU: the engine part runs on GPUs only (--smoke runs its path)")
        suite.row(skipped="no CUDA GPU")
        return
    lvlm = build("llava", TINY_LLAVA if smoke else LLAVA_7B, device, torch.float32 if smoke else torch.bfloat16)
    size = (TINY_LLAVA if smoke else LLAVA_7B)["image_size"]
    n, new = (3, 2) if smoke else (48, 32)
    mix = [[], ["pai"], ["vcd"]]
    reqs = requests_for(lvlm, n, size)
    for backend in ("torch",) if smoke else ("triton", "torch"):
        if not suite.fits(f"engine {backend}", 10.0 if smoke else 25.0):
            continue
        try:
            with Engine(lvlm, backend=backend, max_rows=64) as engine:
                t0 = time.perf_counter()
                handles = [engine.submit(r, mix[i % 3], DecodeSpec(max_new_tokens=new, ignore_eos=True))
                           for i, r in enumerate(reqs)]
                results = [h.result(600) for h in handles]
                wall = time.perf_counter() - t0
        except Exception as exc:
            suite.fail(f"engine {backend}", exc)
            continue
        tokens = sum(len(r.token_ids) for r in results)
        lat = sorted(r.timings["latency_s"] for r in results)
        print(f"  {backend:>7}: {n} requests (none / pai / vcd) in {wall:.2f} s, {tokens / wall:.1f} tok/s, "
              f"latency p50 {lat[len(lat) // 2]:.2f} s, max {lat[-1]:.2f} s", flush=True)
        suite.row(backend=backend, requests=n, wall_s=wall, tok_s=tokens / wall, p50_s=lat[len(lat) // 2],
                  max_s=lat[-1])


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        compiled.COMPILER = "aot_eager"  # dynamo's capture and the static cache; inductor's CPU build takes minutes
    suite = Suite(args)
    print(f"gpu_suite on {json.dumps(suite.doc['machine'])}{' (smoke: tiny shapes, no figures)' if args.smoke else ''}",
          flush=True)
    t0 = time.perf_counter()
    for part in args.parts:
        suite.start(part)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the previous part's model is gone: its memory goes back
        try:
            if part == "kernels":
                part_kernels(suite)
            elif part == "engine":
                part_engine(suite)
            else:
                part_model(suite, part)
        except Exception as exc:  # e.g. out of memory: the next part still runs
            suite.fail("part", exc)
        suite.end()
    suite.doc["total_s"] = time.perf_counter() - t0
    suite.save()
    print(f"\ntotal {suite.doc['total_s']:.0f} s; skipped {len(suite.doc['skipped'])}, "
          f"failed {len(suite.doc['failed'])}; wrote {suite.out}", flush=True)
    for line in suite.doc["skipped"]:
        print("  skipped: " + line)
    return 1 if args.smoke and suite.doc["failed"] else 0


if __name__ == "__main__":
    sys.exit(main(ARGS))
