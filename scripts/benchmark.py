"""Performance benchmarks: one JSON document with the machine, every figure, its target and whether it is met.

    python scripts/benchmark.py --quick --out runs/benchmark-quick.json   # about 2 minutes on 2 CPU cores, +1.5 contended_step
    python scripts/benchmark.py --out runs/benchmark.json                 # the full run (under 20 minutes)

Every comparison is a ratio of two things measured side by side in this run, on this machine,
interleaved (A, B, A, B, ...) so a neighbour's load hits both sides alike; the machine's load average
is recorded before and after. Models are built from configs with random weights (speed does not depend
on the weights): a ViT-B/32-shaped CLIP (the quick run keeps its widths but 2 layers per tower) and
the demo base (`recipes/assets/demo-clip`). Peak memory is measured in a fresh subprocess per
configuration (peak resident set size of the training steps, Linux `VmHWM` after a reset, minus
what the interpreter held before the model existed).

Entries: step_overhead, mfu_fp32, mfu_bf16, attention_kernels, memory, gradcache_memory, data_pipeline,
embedding_throughput, contended_step (quick and full runs), faiss (full run only).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from finetune import threads, timing
from finetune.quiet import quiet_third_party_notices
from finetune.timing import side_by_side

quiet_third_party_notices()

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "recipes" / "assets" / "demo-clip"

# name -> (vision width, vision layers, vision heads, vision mlp, patch, image size,
#          text width, text layers, text heads, text mlp, projection)
SHAPES = {
    "vit-b32": (768, 12, 12, 3072, 32, 224, 512, 12, 8, 2048, 512),
    "vit-b32-2layer": (768, 2, 12, 3072, 32, 224, 512, 2, 8, 2048, 512),
    "tiny": (32, 2, 2, 64, 8, 32, 32, 2, 2, 64, 32),
}
# contended_step: the demo recipe's model and batch; steps per timed call, calls per worker while busy and
# while idle (idle calls are short, and idle differences small: more of them)
CONTENDED = dict(model="demo", batch=128, steps=4, rounds=5, idle_rounds=11, competitor_n=512)
SETTINGS = {  # mode -> what each entry runs
    "full": dict(
        shape="vit-b32",
        batch=8,
        steps=3,
        micro=2,
        memory_batch=8,
        pipeline_images=32,
        embed_batch=16,
        contended=CONTENDED,
        faiss=(100_000, 1_000_000),
    ),
    "quick": dict(
        shape="vit-b32-2layer",
        batch=16,
        steps=4,
        micro=2,
        memory_batch=16,
        pipeline_images=24,
        embed_batch=32,
        contended=CONTENDED | dict(rounds=3, idle_rounds=7),
        faiss=(),
    ),
    "tiny": dict(shape="tiny", batch=8, steps=2, micro=2, memory_batch=8, pipeline_images=4, embed_batch=8, contended=None, faiss=()),
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "mlp.fc1", "mlp.fc2")


# ----------------------------------------------------------------------------- the machine


def machine() -> dict:
    return {
        **timing.machine(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else []


# ----------------------------------------------------------------------------- models and batches


def build_processor(image_size: int):
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizerFast

    tokenizer = CLIPTokenizerFast.from_pretrained(DEMO)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def build_clip(shape: str, vocab_size: int, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    vw, vl, vh, vm, patch, size, tw, tl, th, tm, proj = SHAPES[shape]
    config = CLIPConfig(
        vision_config=dict(
            hidden_size=vw, num_hidden_layers=vl, num_attention_heads=vh, intermediate_size=vm, patch_size=patch, image_size=size
        ),
        text_config=dict(
            hidden_size=tw,
            num_hidden_layers=tl,
            num_attention_heads=th,
            intermediate_size=tm,
            vocab_size=vocab_size,
            max_position_embeddings=77,
        ),
        projection_dim=proj,
    )
    torch.manual_seed(seed)
    return CLIPModel(config).eval()


def shape_dict(shape: str) -> dict:
    vw, vl, vh, vm, patch, size, tw, tl, th, tm, proj = SHAPES[shape]
    return {"name": shape, "vision": f"{vl}x{vw} patch {patch} @ {size}px", "text": f"{tl}x{tw}", "projection": proj}


def photo_like(width: int, height: int, seed: int):
    """Smooth structure plus sensor-like noise: what photos look like to a codec."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    pixels = np.asarray(coarse).astype(np.float32) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def encoded_images(n: int, fmt: str, width: int = 640, height: int = 480) -> list[dict]:
    out = []
    for i in range(n):
        buffer = io.BytesIO()
        photo_like(width, height, i).save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        out.append({"bytes": buffer.getvalue(), "path": None})
    return out


def collated_batch(processor, n: int, image_size: int) -> dict:
    """A batch from the toolkit's own collator (PNG rows at the model's size)."""
    from data_tools.collate import ImageTextCollator

    images = encoded_images(n, "PNG", image_size, image_size)
    captions = ["a large red circle in the top left", "two small blue squares", "a green triangle at the bottom"]
    rows = [{"image": images[i], "caption": captions[i % 3], "image_index": i, "source_row": i, "image_id": str(i)} for i in range(n)]
    return ImageTextCollator(processor, 77)(rows)


def add_lora(model):
    from finetune.models.lora import TowerLora
    from finetune.models.lora import add_lora as toolkit_add_lora

    settings = TowerLora(enabled=True, rank=8, alpha=16.0, dropout=0.0, target_modules=LORA_TARGETS, layers=None)
    return toolkit_add_lora(model, vision=settings, text=settings, train_projections=False, train_logit_scale=False)


# ----------------------------------------------------------------------------- timing


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Fastest seconds per call of each fn, calls interleaved round-robin.

    The fastest of several calls, not the median: on a machine shared with other work, slowdowns
    come from the neighbours, and the minimum is the cost of the code itself (timeit's reasoning)."""
    return {name: min(times) for name, times in side_by_side(fns, repeats=repeats, warmup=warmup).items()}


def toolkit_step_fn(model, batch, precision: str):
    """The toolkit's training step: Accelerate-prepared model, its loss, its step, AdamW."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from finetune.models.attention import apply_attention
    from finetune.training.losses import ClipInfoNCE
    from finetune.training.step import build_adamw, plain_step

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=precision)
    # Attention kernels as `finetune/train.py` sets them (model.attn_implementation: auto, captions up to 77 tokens).
    apply_attention(model, "auto", on_cpu=accelerator.device.type == "cpu", mixed_precision=precision, image_size=None, max_text_length=77)
    params = [p for p in model.parameters() if p.requires_grad]
    adamw = build_adamw(params, lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, mixed_precision=precision)  # torch's defaults
    prepared, optimizer = accelerator.prepare(model, adamw)
    loss_fn = ClipInfoNCE()
    batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    prepared.train()

    def step():
        plain_step(prepared, batch, loss_fn, gather=True, backward=accelerator.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def minimal_step_fn(model, batch, precision: str):
    """The reference: plain PyTorch + PEFT, pre-collated tensors, CLIP's loss from the model's logits."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device).train()
    inputs = {k: batch[k].to(device) for k in ("pixel_values", "input_ids", "attention_mask")}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)  # the toolkit's update, so the ratio is the loop's overhead
    targets = torch.arange(inputs["pixel_values"].shape[0], device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            logits = model(**inputs).logits_per_image
        loss = 0.5 * (F.cross_entropy(logits.float(), targets) + F.cross_entropy(logits.float().T, targets))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def entry(
    name: str,
    *,
    model: dict | None,
    batch: int | None,
    precision: str | None,
    measured: dict,
    ratio: float | None,
    target: str,
    met: bool | None,
    notes: str = "",
) -> dict:
    return {
        "name": name,
        "model": model,
        "batch": batch,
        "precision": precision,
        "measured": measured,
        "ratio": None if ratio is None else round(ratio, 4),
        "target": target,
        "met": met,
        "notes": notes,
    }


# ----------------------------------------------------------------------------- entries


def bench_step_overhead(s: dict, processor, shape: str, label: str) -> tuple[dict, float]:
    from peft import LoraConfig, get_peft_model

    vocab = len(processor.tokenizer)
    image_size = SHAPES[shape][5] if shape in SHAPES else processor.image_processor.crop_size["height"]
    batch = collated_batch(processor, s["batch"], image_size)
    toolkit_model = add_lora(build_clip(shape, vocab) if shape in SHAPES else load_demo())
    minimal_model = build_clip(shape, vocab) if shape in SHAPES else load_demo()
    targets = [n for n, m in toolkit_model.get_base_model().named_modules() if hasattr(m, "lora_A")]
    minimal_model = get_peft_model(minimal_model, LoraConfig(r=8, lora_alpha=16, target_modules=targets, lora_dropout=0.0))
    fns = {"toolkit": toolkit_step_fn(toolkit_model, batch, "no"), "minimal": minimal_step_fn(minimal_model, batch, "no")}
    start = time.perf_counter()
    fns["minimal"]()
    # A small model's step takes milliseconds: many more repeats, so the fastest of them is the code's cost.
    repeats = max(s["steps"], min(100, int(2.0 / max(time.perf_counter() - start, 1e-3))))
    times = interleaved(fns, repeats)
    ratio = times["minimal"] / times["toolkit"]
    images_per_s = s["batch"] / times["toolkit"]
    return entry(
        f"step_overhead[{label}]",
        model=shape_dict(shape) if shape in SHAPES else {"name": "demo base"},
        batch=s["batch"],
        precision="fp32",
        measured={
            "toolkit_s_per_step": round(times["toolkit"], 5),
            "minimal_s_per_step": round(times["minimal"], 5),
            "repeats": repeats,
            "toolkit_images_per_s": round(images_per_s, 2),
        },
        ratio=ratio,
        target="minimal/toolkit step time >= 0.97",
        met=ratio >= 0.97,
    ), images_per_s


def load_demo():
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(DEMO).eval()


def matmul_flops_per_s(dtype: torch.dtype, n: int, repeats: int) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds = interleaved({"mm": lambda: a @ b}, repeats)["mm"]
    return 2 * n**3 / seconds


MATMUL_OPS = {
    "aten::mm",
    "aten::addmm",
    "aten::bmm",
    "aten::baddbmm",
    "aten::mkldnn_convolution",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
}


def time_by_op(step) -> dict:
    """Where one step's time goes (torch.profiler, self time per operator): the share spent in matmuls
    and attention kernels, in dtype casts (`copy_`), and the top operators; shares of the profiled total."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = [(e.key, e.self_cpu_time_total) for e in prof.key_averages()]
    total = sum(t for _, t in rows) or 1.0
    top = sorted(rows, key=lambda r: -r[1])[:8]
    return {
        "matmul_share": round(sum(t for k, t in rows if k in MATMUL_OPS) / total, 3),
        "copy_share": round(sum(t for k, t in rows if k == "aten::copy_") / total, 3),
        "top": {k: round(t / total, 3) for k, t in top},
    }


def bench_mfu(s: dict, processor, shape: str, precision: str, matmul_n: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    model = add_lora(build_clip(shape, len(processor.tokenizer)))
    batch = collated_batch(processor, s["batch"], SHAPES[shape][5])
    step = toolkit_step_fn(model, batch, "no" if precision == "fp32" else "bf16")
    step()
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    mm = matmul_flops_per_s(dtype, matmul_n, max(3, s["steps"]))
    seconds = interleaved({"step": step}, s["steps"], warmup=0)["step"]
    mm_after = matmul_flops_per_s(dtype, matmul_n, max(3, s["steps"]))
    peak = max(mm, mm_after)
    achieved = flops / seconds
    mfu = achieved / peak
    return entry(
        f"mfu_{precision}",
        model=shape_dict(shape),
        batch=s["batch"],
        precision=precision,
        measured={
            "step_flops": flops,
            "step_s": round(seconds, 4),
            "achieved_gflops": round(achieved / 1e9, 2),
            "matmul_gflops": round(peak / 1e9, 2),
            "matmul_n": matmul_n,
            "step_s_if_matmuls_ran_at_peak": round(flops / peak, 4),
            "time_by_op": time_by_op(step),
        },
        ratio=mfu,
        target="achieved FLOP/s >= 0.40 x large-matmul FLOP/s",
        met=mfu >= 0.40,
    )


def bench_attention_kernels(lengths: tuple[int, ...], repeats: int) -> dict:
    """One attention layer, forward + backward, eager (matmul, softmax, matmul) vs PyTorch's fused sdpa, in
    bf16 and fp32: the measurement behind `model.attn_implementation: auto` (finetune/models/lora.py)."""
    from finetune.models.attention import EAGER_MAX_TOKENS_CPU_BF16

    batch, heads, head_dim = 8, 12, 64
    measured = {}
    for dtype, label in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        for n in lengths:
            q, k, v = (torch.randn(batch, heads, n, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))

            def sdpa():
                F.scaled_dot_product_attention(q, k, v).sum().backward()

            def eager():
                weights = torch.softmax((q @ k.transpose(-1, -2)) * head_dim**-0.5, dim=-1, dtype=torch.float32).to(dtype)
                (weights @ v).sum().backward()

            times = interleaved({"sdpa": sdpa, "eager": eager}, repeats)
            measured[f"{label}_{n}_tokens"] = {
                "sdpa_ms": round(times["sdpa"] * 1e3, 3),
                "eager_ms": round(times["eager"] * 1e3, 3),
                "eager_speedup": round(times["sdpa"] / times["eager"], 2),
            }
    return entry(
        "attention_kernels",
        model={"batch": batch, "heads": heads, "head_dim": head_dim, "tokens": list(lengths)},
        batch=batch,
        precision="bf16 / fp32",
        measured=measured,
        ratio=None,
        target=f"informs model.attn_implementation: auto (eager on a CPU in bf16 up to {EAGER_MAX_TOKENS_CPU_BF16} tokens)",
        met=None,
        notes="eager_speedup = sdpa time / eager time; > 1: eager is faster",
    )


# --- memory: one subprocess per configuration


def _vm(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def memory_probe(spec: dict) -> dict:
    """Runs in a fresh interpreter: build, train `steps` steps, report peak RSS above the start."""
    import gc

    import bitsandbytes  # noqa: F401  everything imported before the baseline is read
    import peft  # noqa: F401
    from transformers import BitsAndBytesConfig, CLIPModel

    from finetune.models import lora as _model  # noqa: F401
    from finetune.models.qlora import (
        full_precision_modules,
        prepare_quantized_for_training,
    )
    from finetune.training.losses import ClipInfoNCE
    from finetune.training.step import cached_contrastive_step, plain_step

    processor = build_processor(SHAPES[spec["shape"]][5])
    batch = collated_batch(processor, spec["batch"], SHAPES[spec["shape"]][5])
    gc.collect()
    start = _vm("VmRSS")
    model = build_clip(spec["shape"], len(processor.tokenizer))
    if spec["method"] == "qlora":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            config = model.config
            del model
            gc.collect()
            start = _vm("VmRSS")  # the fp32 model written out is not part of QLoRA's footprint
            quant = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32,
                llm_int8_skip_modules=full_precision_modules(config),
            )
            model = CLIPModel.from_pretrained(tmp, quantization_config=quant, device_map={"": "cpu"})
        model = prepare_quantized_for_training(model)
    if spec["method"] in ("lora", "qlora"):
        model = add_lora(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = ClipInfoNCE()
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    except OSError:
        pass
    for _ in range(spec["steps"]):
        if spec.get("micro"):
            cached_contrastive_step(model, batch, loss_fn, gather=False, micro_batch_size=spec["micro"], backward=torch.Tensor.backward)
        else:
            plain_step(model, batch, loss_fn, gather=False, backward=torch.Tensor.backward)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"peak_mib": round((_vm("VmHWM") - start) / 2**20, 1), "trainable": sum(p.numel() for p in params)}


def run_probe(spec: dict) -> dict:
    if spec["shape"] == "tiny":  # the test's setting: in-process, numbers meaningless, seconds not minutes
        return memory_probe(spec)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, __file__, "--memory-probe", json.dumps(spec)], capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(s: dict, shape: str) -> dict:
    common = dict(shape=shape, batch=s["memory_batch"], steps=2)
    peaks = {m: run_probe({**common, "method": m}) for m in tqdm(("full", "lora", "qlora"), desc="memory", leave=False)}
    lora, qlora = (
        _ratio(peaks["lora"]["peak_mib"], peaks["full"]["peak_mib"]),
        _ratio(peaks["qlora"]["peak_mib"], peaks["full"]["peak_mib"]),
    )
    return entry(
        "memory",
        model=shape_dict(shape),
        batch=s["memory_batch"],
        precision="fp32 (QLoRA: nf4 base, double quant, fp32 compute)",
        measured={k: v["peak_mib"] for k, v in peaks.items()} | {"lora_over_full": lora, "qlora_over_full": qlora},
        ratio=lora,
        target="LoRA <= 0.6x full fine-tuning, QLoRA <= 0.45x",
        met=None if lora is None else lora <= 0.6 and qlora <= 0.45,
        notes="peak RSS of 2 training steps (AdamW) above the interpreter's, in a fresh process each",
    )


def bench_gradcache_memory(s: dict, shape: str) -> dict:
    micro = s["micro"]
    plain = run_probe(dict(shape=shape, batch=micro, steps=2, method="lora"))
    cached = run_probe(dict(shape=shape, batch=8 * micro, steps=2, method="lora", micro=micro))
    ratio = _ratio(cached["peak_mib"], plain["peak_mib"])
    return entry(
        "gradcache_memory",
        model=shape_dict(shape),
        batch=8 * micro,
        precision="fp32",
        measured={
            "plain_micro_batch": micro,
            "plain_peak_mib": plain["peak_mib"],
            "cached_batch": 8 * micro,
            "cached_peak_mib": cached["peak_mib"],
        },
        ratio=ratio,
        target="peak(cached, batch 8m, micro m) <= 1.3 x peak(plain, batch m)",
        met=None if ratio is None else ratio <= 1.3,
        notes="LoRA; peak includes the frozen weights both sides hold",
    )


def bench_data_pipeline(s: dict, model_images_per_s: float, image_size: int) -> dict:
    from transformers import CLIPImageProcessor

    from data_tools.loading import decode_image
    from data_tools.pipeline import (
        default_num_workers,
        preprocessed_image,
    )

    processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    n = s["pipeline_images"]
    sources = {"jpeg": encoded_images(n, "JPEG"), "png": encoded_images(n, "PNG")}
    cached = [{"bytes": _png_bytes(preprocessed_image(decode_image(v), processor)), "path": None} for v in sources["jpeg"]]

    def pipeline(values, draft):
        return lambda: processor(images=[decode_image(v, draft) for v in values], return_tensors="pt")

    fns = {
        "jpeg_full_decode": pipeline(sources["jpeg"], None),
        "jpeg_draft": pipeline(sources["jpeg"], image_size),
        "png": pipeline(sources["png"], image_size),
        "preresized_cache": pipeline(cached, image_size),
    }
    times = interleaved(fns, repeats=max(2, s["steps"] // 2))
    per_worker = {k: round(n / t, 1) for k, t in times.items()}
    workers = default_num_workers(timing.available_cores(), 1)
    default_rate = per_worker["jpeg_draft"] * workers  # recipe defaults: auto workers, JPEG draft decoding
    ratio = default_rate / model_images_per_s
    return entry(
        "data_pipeline",
        model={"images": "640x480 photo-like", "to": f"{image_size}px"},
        batch=None,
        precision=None,
        measured={
            "images_per_s_per_worker": per_worker,
            "default_workers": workers,
            "model_train_images_per_s": round(model_images_per_s, 2),
        },
        ratio=ratio,
        target="default workers x JPEG-draft images/s >= 1.2 x the model's training images/s",
        met=ratio >= 1.2,
        notes="per-worker rates measured in one process; the model rate is the toolkit step of step_overhead",
    )


def _ratio(a: float, b: float) -> float | None:
    """a / b, or None where b is zero (the tiny setting's in-process memory probe can measure 0)."""
    return round(a / b, 4) if b > 0 else None


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def bench_embedding(s: dict, processor, shape: str) -> dict:
    """Image-tower throughput of what `domainclip export --dtype` ships (finetune/export/quantize.py: fp32,
    weights cast to bf16, int8 dynamic quantization), and R@1 of each on the demo."""
    from finetune.export.quantize import quantize

    model = build_clip(shape, len(processor.tokenizer))
    variants = {"fp32": model, "bf16": quantize(model, "bf16"), "int8": quantize(model, "int8")}
    size = SHAPES[shape][5]
    pixels = torch.randn(s["embed_batch"], 3, size, size)

    def embed(m):
        dtype = next(m.parameters()).dtype  # int8 Linears keep fp32 inputs

        def run():
            with torch.no_grad():
                m.get_image_features(pixel_values=pixels.to(dtype))

        return run

    times = interleaved({name: embed(m) for name, m in variants.items()}, max(2, s["steps"] // 2))
    rate = {k: round(s["embed_batch"] / t, 2) for k, t in times.items()}
    r1 = demo_r1_by_precision(16 if shape == "tiny" else 300)
    best = max(("bf16", "int8"), key=lambda k: rate[k])
    speedup = rate[best] / rate["fp32"]
    loss = r1["fp32"] - r1[best]
    return entry(
        "embedding_throughput",
        model=shape_dict(shape),
        batch=s["embed_batch"],
        precision="fp32 / bf16 weights / int8 dynamic (torch)",
        measured={"images_per_s": rate, "demo_source_t2i_R@1": r1, "fastest": best},
        ratio=speedup,
        target=">= 2.5x fp32 images/s at <= 0.5 pt R@1 loss",
        met=speedup >= 2.5 and loss <= 0.5,
        notes="the models `domainclip export --dtype fp32|bf16|int8` ships (finetune/export/quantize.py `quantize`); "
        "R@1 of the demo base on its source eval set (300 images in quick/full)",
    )


def demo_r1_by_precision(num_images: int) -> dict[str, float]:
    from data_tools.loading import RetrievalSet, load_image_text_dataset
    from finetune.evaluation.evaluate import evaluate_retrieval
    from finetune.export.quantize import quantize
    from finetune.models.load import load_model

    model, processor = load_model(str(DEMO))
    pairs = load_image_text_dataset(
        key="benchmark",
        path=None,
        name=None,
        revision=None,
        data_files=None,
        split="train",
        image_column="image",
        caption_column="caption",
        image_id_column=None,
        label_column=None,
        max_samples=None,
        synthetic=dict(domain="source", num_images=num_images, captions_per_image=1, image_size=32, seed=1),
    )
    sets = {"source": RetrievalSet.from_pairs(pairs)}
    out = {}
    for name in ("fp32", "bf16", "int8"):
        m = model if name == "fp32" else quantize(model, name)
        results, _ = evaluate_retrieval(
            m, processor=processor, sets=sets, batch_size=256, max_text_length=77, ks=(1,), num_workers=0, desc=name
        )
        out[name] = results["source"]["t2i"]["R@1"]
    return out


# --- contended_step: the CPU thread policy on a machine another process keeps busy (finetune/threads.py)

WORKER_LINE = "contended_step "  # a worker's replies start with this; anything else on its stdout is not for us
# What a second training looks like to the scheduler: busy, torch's default threads, spinning at barriers.
COMPETITOR = """
import torch
a = torch.randn({n}, {n})
a @ a
print("ready", flush=True)
while True:
    a @ a
"""


def worker_env(**extra: str) -> dict[str, str]:
    """The environment of a run nobody tuned: no thread or wait settings, CPU only (GPU runs keep their settings)."""
    unset = ("OMP_NUM_THREADS", "DOMAINCLIP_NUM_THREADS", "MKL_NUM_THREADS", "LOCAL_WORLD_SIZE", "ACCELERATE_DYNAMO_BACKEND")
    env = {k: v for k, v in os.environ.items() if k not in (*unset, *threads.WAIT_SETTINGS)}
    return env | {"CUDA_VISIBLE_DEVICES": ""} | extra


class StepWorker:
    """A process that trains the demo model (the toolkit's step: Accelerate, LoRA, its loss, fused AdamW) under one
    thread policy, chosen when it starts as finetune/train.py chooses it, and times `n` steps when asked.

    A process per policy because OpenMP reads its wait policy once, when torch loads it."""

    def __init__(self, policy: str, spec: dict, env: dict[str, str], log: Path):
        self.log = log
        command = [sys.executable, __file__, f"--step-worker={policy}", "--worker-spec", json.dumps(spec)]
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=ROOT
            )
        self.choice = self._reply()  # threads, wait policy, load seen: after the model is built and warm
        self.threads = self.choice["threads"]

    def _reply(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(WORKER_LINE):
                return json.loads(line[len(WORKER_LINE) :])
        raise RuntimeError(f"contended_step worker ended (exit {self.proc.wait()}):\n{self.log.read_text()[-2000:]}")

    def steps(self, n: int, follow: bool = True) -> float:
        """Seconds per step over n steps (`threads` then holds the thread count at their end); `follow`: a
        following worker steps its ThreadFollower (else: the same process without it, for its cost)."""
        self.proc.stdin.write(f"{n} {int(follow)}\n")
        self.proc.stdin.flush()
        reply = self._reply()
        self.threads = reply["threads"]
        return reply["s_per_step"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def step_worker(policy: str, spec: dict) -> int:
    """The worker's side: choose threads (new: as finetune/train.py does; following: that, and a ThreadFollower
    stepped after every step; old: torch's default), build, warm up, then time steps on request (stdin: a step
    count per line; stdout: seconds per step)."""
    choice = threads.set_cpu_threads() if policy in ("new", "following") else None
    follower = threads.ThreadFollower(choice) if policy == "following" else None
    if spec["model"] == "demo":
        model, size = load_demo(), 32
    else:
        model, size = build_clip(spec["model"], len(build_processor(32).tokenizer)), SHAPES[spec["model"]][5]
    processor = build_processor(size)
    train_step = toolkit_step_fn(add_lora(model), collated_batch(processor, spec["batch"], size), "no")

    def step():
        train_step()
        if follower is not None:
            follower.step()

    step()
    step()
    ready = {
        "threads": torch.get_num_threads(),
        "openmp_wait": threads.wait_setting(os.environ) or "default",
        "other_load_at_start": None if choice is None or choice.other_load is None else round(choice.other_load, 2),
    }
    print(WORKER_LINE + json.dumps(ready), flush=True)
    for line in sys.stdin:
        n, follow = (int(x) for x in line.split())
        if follower is not None:
            follower.restart()  # idle since the last call while the other workers ran: not load to follow
        start = time.perf_counter()
        for _ in range(n):
            (step if follow else train_step)()
        reply = {"s_per_step": (time.perf_counter() - start) / n, "threads": torch.get_num_threads()}
        print(WORKER_LINE + json.dumps(reply), flush=True)
    return 0


def cpu_jiffies() -> list[int]:
    """The machine's CPU time so far by kind (/proc/stat: user nice system idle iowait irq softirq steal); [] off Linux."""
    try:
        return [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """The share of CPU time the hypervisor gave to other guests between two `cpu_jiffies` (a busy host, not us)."""
    spent = [b - a for a, b in zip(before, after)]
    return round(spent[7] / sum(spent), 3) if len(spent) == 8 and sum(spent) else None


def start_competitor(n: int, env: dict[str, str], *, own_session: bool) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", COMPETITOR.format(n=n)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=own_session,
    )
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError(f"contended_step: the competing process ended (exit {proc.wait()})")
    return proc


def bench_contended_step(s: dict) -> dict:
    """Training steps/s of the demo recipe's model under the old thread policy (torch's default threads) and the
    new one (finetune/threads.py), idle and then beside one busy process (a torch matmul loop with its own default
    threads, in a session of its own like another user's job), each phase's workers interleaved call by call.

    Workers, one process each (OpenMP reads its settings once): old; new (threads from the load at its start, as
    finetune/train.py sets them); following (new, and a ThreadFollower stepped after every step); passive (new,
    OMP_WAIT_POLICY=PASSIVE: the alternative measured and rejected); one_thread (idle only: would fewer threads
    do for a model this small?); new_started_busy (started beside the competitor: it sees the load)."""
    spec = s["contended"]
    n, rounds = spec["steps"], spec["rounds"]
    worker_spec = {"model": spec["model"], "batch": spec["batch"]}
    others_before = threads.other_processes_load(1.0)
    load_before = load_average()
    workers: dict[str, StepWorker] = {}
    competitor = None

    def start(name: str, policy: str = "new", **env: str) -> None:  # one at a time: no start-up in a load sample
        workers[name] = StepWorker(policy, worker_spec, worker_env(**env), Path(tmp, f"{name}.log"))

    def timed(names: list[str], repeats: int) -> tuple[dict[str, float], dict[str, int]]:
        """Median seconds per step of each worker, and its threads at the end. "following_off": the following
        worker's process with its follower not stepped (the one thing that differs from `old` on an idle machine)."""
        calls = {
            name: (lambda w=workers[name.removesuffix("_off")], follow=not name.endswith("_off"): w.steps(n, follow)) for name in names
        }
        times = side_by_side(calls, repeats=repeats, warmup=0)
        return {name: statistics.median(t) / n for name, t in times.items()}, {
            name: workers[name.removesuffix("_off")].threads for name in names
        }

    with tempfile.TemporaryDirectory() as tmp:
        try:
            start("old", "old")
            start("new")
            start("following", "following")
            start("passive", OMP_WAIT_POLICY="PASSIVE")
            start("one_thread", DOMAINCLIP_NUM_THREADS="1")
            jiffies = [cpu_jiffies()]
            idle, idle_threads = timed(["old", "new", "following", "following_off", "passive", "one_thread"], spec["idle_rounds"])
            jiffies.append(cpu_jiffies())
            workers["one_thread"].close()
            competitor = start_competitor(spec["competitor_n"], worker_env(), own_session=True)
            time.sleep(1.0)
            start("new_started_busy")
            jiffies.append(cpu_jiffies())
            busy, busy_threads = timed(["old", "new", "following", "passive", "new_started_busy"], rounds)
            jiffies.append(cpu_jiffies())
        finally:
            if competitor is not None:
                competitor.kill()
                competitor.wait()
            for worker in workers.values():
                worker.close()
    per_s = lambda times: {k: round(1 / v, 3) for k, v in times.items()}
    ratios = {
        "old": idle["old"] / busy["old"],
        "new_started_busy": idle["new"] / busy["new_started_busy"],
        "new_started_idle": idle["new"] / busy["new"],
        "following": idle["following"] / busy["following"],
        "passive": idle["passive"] / busy["passive"],
    }
    # Idle, old and new set torch and OpenMP alike (threads_idle, choices_at_start): what differs is the follower's
    # looks, compared within one process; processes set up alike differ by several percent (new vs old).
    idle_ratio = idle["following_off"] / idle["following"]
    return entry(
        "contended_step",
        model={"name": "demo base" if spec["model"] == "demo" else spec["model"], "lora": "rank 8, attention + MLP, both towers"},
        batch=spec["batch"],
        precision="fp32",
        measured={
            "idle_steps_per_s": per_s(idle),
            "busy_steps_per_s": per_s(busy),
            "busy_over_idle": {k: round(v, 3) for k, v in ratios.items()},
            "new_idle_over_old_idle": round(idle_ratio, 3),
            "new_idle_over_old_idle_across_processes": round(idle["old"] / idle["new"], 3),
            "over_old_idle": {k: round(idle["old"] / v, 3) for k, v in idle.items()},
            "over_old_busy": {k: round(busy["old"] / v, 3) for k, v in busy.items()},
            "threads_idle": idle_threads,
            "threads_busy": busy_threads,
            "choices_at_start": {name: w.choice for name, w in workers.items()},
            "competitor": f"torch {spec['competitor_n']}x{spec['competitor_n']} matmul loop, torch's default threads and OpenMP wait, "
            "its own session",
            "other_load_before": None if others_before is None else round(others_before, 2),
            "steal_share": {"idle": steal_share(*jiffies[0:2]), "busy": steal_share(*jiffies[2:4])},
            "load_average_before": load_before,
            "steps_per_call": n,
            "calls": {"idle": spec["idle_rounds"], "busy": rounds},
            "machine": timing.machine(),
        },
        ratio=ratios["new_started_busy"],
        target="new policy: busy/idle steps/s >= 0.6, idle >= 0.95x the old policy's (its follower's cost, in one process)",
        met=ratios["new_started_busy"] >= 0.6 and idle_ratio >= 0.95,
        notes="ratio: busy/idle of the new policy as finetune/train.py sets it (a run started beside the busy process over "
        "one started idle); following: with a ThreadFollower stepped every step; old: torch's default threads and OpenMP "
        "wait; medians of the interleaved calls",
    )


def clustered_vectors(n: int, dim: int, rng, clusters: int = 1000, rank: int = 24) -> np.ndarray:
    """Embedding-like data: clusters whose members vary along a few directions of their own
    (low intrinsic dimension, like real image embeddings), plus a little isotropic noise; unit rows."""
    centers = rng.standard_normal((clusters, dim), dtype=np.float32)
    members = rng.integers(0, clusters, n)
    out = np.empty((n, dim), dtype=np.float32)
    for c in range(clusters):  # one (members, rank) @ (rank, dim) product per cluster: no big temporaries
        rows = np.flatnonzero(members == c)
        basis = rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
        z = rng.standard_normal((len(rows), rank), dtype=np.float32)
        out[rows] = centers[c] + 0.8 * (z @ basis) + 0.05 * rng.standard_normal((len(rows), dim), dtype=np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


FAISS_MEMORY_SHARE = 0.2  # the index's budget: this share of flat's bytes, the target's memory bound


def bench_faiss(sizes: tuple[int, ...], dim: int = 512) -> list[dict]:
    """The index `domainclip index` builds (its `build_index`: type chosen by `choose_factory` from the
    size and a memory budget of 0.2x flat's bytes, nprobe tuned to recall@10 0.95 on held-out queries)
    against exact flat search, on other queries than the ones it was tuned on."""
    import faiss

    from finetune.retrieval.index import build_index

    out = []
    rng = np.random.default_rng(0)
    for n in tqdm(sizes, desc="faiss", leave=False):
        data = clustered_vectors(n, dim, rng)
        picks = rng.choice(n, 200, replace=False)  # queries: perturbed corpus rows, half tune, half measure
        noisy = data[picks] + 0.02 * rng.standard_normal((200, dim), dtype=np.float32)
        noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
        tuning, queries = noisy[:100], noisy[100:]

        start = time.perf_counter()
        flat = faiss.IndexFlatIP(dim)
        flat.add(data)
        flat_build = time.perf_counter() - start
        flat_bytes = faiss.serialize_index(flat).nbytes
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missed recall target shows in the entry, not as a warning
            index, manifest = build_index(data, tuning, memory_budget=int(FAISS_MEMORY_SHARE * flat_bytes), target_recall=0.95)
        results = {}
        for name, idx, build in (("flat", flat, flat_build), ("chosen", index, manifest["build_seconds"])):
            results[name] = {"build_s": round(build, 2), "memory_mib": round(faiss.serialize_index(idx).nbytes / 2**20, 1)}
        t1 = interleaved({name: (lambda i=idx: i.search(queries[:1], 10)) for name, idx in (("flat", flat), ("chosen", index))}, 10)
        t100 = interleaved({name: (lambda i=idx: i.search(queries, 10)) for name, idx in (("flat", flat), ("chosen", index))}, 3)
        for name in results:
            results[name].update(query_ms_batch1=round(t1[name] * 1e3, 3), query_ms_batch100=round(t100[name] * 1e3, 2))
        exact = flat.search(queries, 10)[1]
        approx = index.search(queries, 10)[1]
        del flat, index
        recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(approx, exact)]))
        speed = t100["flat"] / t100["chosen"]
        memory = results["chosen"]["memory_mib"] / results["flat"]["memory_mib"]
        out.append(
            entry(
                f"faiss[{n}]",
                model={"vectors": n, "dim": dim, "data": "1000 clusters of rank 24 + noise, unit rows"},
                batch=100,
                precision="fp32",
                measured={
                    **results,
                    "index": f"{manifest['factory']}, {manifest['search_params']}",
                    "selection_reason": manifest["selection_reason"],
                    "tuning": manifest["tuning"],
                    "recall_at_10": round(recall, 4),
                    "recall_at_10_tuning": manifest["recall_at_10"],
                    "speedup_batch100": round(speed, 2),
                    "speedup_batch1": round(t1["flat"] / t1["chosen"], 2),
                    "memory_ratio": round(memory, 4),
                },
                ratio=speed,
                target="at 1M: >= 50x faster than flat at recall@10 >= 0.95, <= 0.2x its memory",
                met=(speed >= 50 and recall >= 0.95 and memory <= 0.2) if n >= 1_000_000 else None,
                notes=f"the index `domainclip index` builds with --memory-budget {FAISS_MEMORY_SHARE}x flat's bytes, nprobe tuned on "
                "100 held-out queries; recall measured on 100 others",
            )
        )
        del data
    return out


# ----------------------------------------------------------------------------- main


def markdown_table(doc: dict) -> str:
    """One row per entry: figure, model, batch, precision, ratio, target, met; the machine underneath."""
    m = doc["machine"]
    lines = ["| figure | model | batch | precision | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for e in doc["entries"]:
        model = (e["model"] or {}).get("name") or ", ".join(f"{k} {v}" for k, v in (e["model"] or {}).items())
        met = {True: "yes", False: "**no**", None: "n/a"}[e["met"]]
        ratio = "" if e["ratio"] is None else f"{e['ratio']:.3g}"
        lines.append(f"| {e['name']} | {model} | {e['batch'] or ''} | {e['precision'] or ''} | {ratio} | {e['target']} | {met} |")
    lines.append("")
    lines.append(
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, GPU {m['gpu'] or 'none'}, torch {m['torch']}; "
        f"load average {doc['load_average_before']} before, {doc['load_average_after']} after; {doc['mode']} run, {doc['seconds']} s."
    )
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick", action="store_true", help="2-layer towers, fewer steps: about 2 minutes on 2 CPU cores, +1.5 contended_step"
    )
    parser.add_argument("--tiny", action="store_true", help="the tiniest setting (the test suite's): seconds, numbers meaningless")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--skip", nargs="*", default=[], help="entries to leave out (e.g. faiss embedding_throughput)")
    parser.add_argument("--table", default=None, metavar="JSON", help="print a saved run as the README's markdown table")
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--step-worker", choices=("old", "new", "following"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-spec", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.table:
        print(markdown_table(json.loads(Path(args.table).read_text())))
        return 0
    if args.memory_probe:
        print(json.dumps(memory_probe(json.loads(args.memory_probe))))
        return 0
    if args.step_worker:
        return step_worker(args.step_worker, json.loads(args.worker_spec))
    mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    s = SETTINGS[mode]
    shape = s["shape"]
    started = time.time()
    doc = {"mode": mode, "machine": machine(), "load_average_before": load_average(), "entries": []}
    processor = build_processor(SHAPES[shape][5])
    matmul_n = 256 if mode == "tiny" else 2048
    jobs = [
        ("step_overhead", lambda: bench_step_overhead(s, processor, shape, shape)),
        ("step_overhead", lambda: bench_step_overhead(s, build_processor(32), "demo", "demo base")),
        ("mfu_fp32", lambda: bench_mfu(s, processor, shape, "fp32", matmul_n)),
        ("mfu_bf16", lambda: bench_mfu(s, processor, shape, "bf16", matmul_n)),
        ("attention_kernels", lambda: bench_attention_kernels((17, 50) if mode == "tiny" else (50, 77, 197, 257), s["steps"])),
        ("memory", lambda: bench_memory(s, shape)),
        ("gradcache_memory", lambda: bench_gradcache_memory(s, shape)),
        ("data_pipeline", lambda: bench_data_pipeline(s, model_rate, SHAPES[shape][5])),
        ("embedding_throughput", lambda: bench_embedding(s, processor, shape)),
        ("contended_step", lambda: bench_contended_step(s)),
        ("faiss", lambda: bench_faiss(s["faiss"])),
    ]
    model_rate = None
    for name, job in tqdm(jobs, desc="benchmark"):
        if name in args.skip or (name == "faiss" and not s["faiss"]) or (name == "contended_step" and not s["contended"]):
            continue
        job_start = time.time()
        result = job()
        if isinstance(result, tuple):
            result, rate = result
            model_rate = model_rate or rate  # the first step entry: the benchmark shape's training rate
        for e in result if isinstance(result, list) else [result]:
            e["seconds"] = round(time.time() - job_start, 1)
            doc["entries"].append(e)
        write_doc(doc, args.out, started, complete=False)  # a run cut short keeps what it measured
    text = write_doc(doc, args.out, started, complete=True)
    print(text)
    reset_accelerate()
    return 0


def reset_accelerate() -> None:
    """Forget the Accelerators the entries made (a caller in the same process starts clean)."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def write_doc(doc: dict, out: str | None, started: float, *, complete: bool) -> str:
    doc["complete"] = complete
    doc["load_average_after"] = load_average()
    doc["seconds"] = round(time.time() - started, 1)
    text = json.dumps(doc, indent=2)
    if out:
        from finetune.io import atomic_write_text

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(out), text + "\n")
    return text


if __name__ == "__main__":
    sys.exit(main())
