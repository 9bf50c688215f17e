"""ONNX towers of an export and int8 through ONNX Runtime, each checked against PyTorch before it ships.

    merged fp32 model -> image tower: pixel_values (B, 3, H, W) -> L2-normalised embedding (B, D)
                      -> text tower:  input_ids, attention_mask (B, L) -> L2-normalised embedding (B, D)
                      -> EXPORT/onnx/image.onnx, text.onnx (B and L dynamic)
                      -> parity gate: every target eval row, cosine(ONNX, PyTorch) >= MIN_COSINE
                      -> [--onnx-int8: onnxruntime dynamic quantization -> image.int8.onnx, text.int8.onnx,
                          gated on target R@1 like the torch int8 export (export.max_r1_drop)]

Exporter: torch's default `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript). It exports
both towers of both architectures in the model table (CLIPModel, VisionTextDualEncoderModel with an
XLM-R text tower) with a dynamic batch axis and a dynamic sequence axis, so the TorchScript exporter
(`dynamo=False`, deprecated since torch 2.9) is not needed. The towers are reached through
`finetune.models.towers.image_features` / `text_features`, as everywhere else; the graph is traced at the
export's image size (the processor's), so it reads images as the processor prepares them.

int8: `onnxruntime.quantization.quantize_dynamic`, int8 weights with one scale per output channel,
activations quantized per batch at run time (MatMulInteger). As with torch's dynamic quantization, an
input embedded alone differs slightly from the same input embedded in a batch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from finetune.errors import ExportError, OnnxParityError
from finetune.export.merge import file_sha256
from finetune.export.quantize import r1_drops
from finetune.retrieval.embedders import OnnxEmbedder, OnnxTowers, TorchEmbedder, default_threads
from finetune.runfolder import ONNX as ONNX_DIR
from finetune.timing import side_by_side

TOWER_FILES = {"image": "image.onnx", "text": "text.onnx"}
INT8_FILES = {"image": "image.int8.onnx", "text": "text.int8.onnx"}
IMAGE_INPUTS = ("pixel_values",)
TEXT_INPUTS = ("input_ids", "attention_mask")
OUTPUTS = {"image": "image_embeds", "text": "text_embeds"}
MIN_COSINE = 0.999  # the fp32 graphs' parity floor, every eval row
EXPORTER = "torch.onnx.export(dynamo=True)"
INT8_METHOD = "onnxruntime.quantization.quantize_dynamic(QInt8 weights, per_channel=True)"
# A graph above this size keeps its weights in an external .data file beside it (protobuf's 2 GB limit).
EXTERNAL_DATA_BYTES = 1_500_000_000


# ----------------------------------------------------------------------------- the towers as modules


class ImageTower(nn.Module):
    """pixel_values (B, 3, H, W) -> L2-normalised image embeddings (B, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from finetune.models.towers import image_features

        return F.normalize(image_features(self.model, pixel_values), dim=-1)


class TextTower(nn.Module):
    """input_ids, attention_mask (B, L) -> L2-normalised caption embeddings (B, D)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        from finetune.models.towers import text_features

        return F.normalize(text_features(self.model, input_ids, attention_mask), dim=-1)


@contextlib.contextmanager
def _quiet_exporter():
    """The dynamo exporter's progress lines, torchvision notices and deprecation warnings, silenced."""
    names = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "root")
    loggers = [logging.getLogger(n) if n != "root" else logging.getLogger() for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_towers(model: nn.Module, processor, out_dir: str | os.PathLike, *, opset: int | None = None) -> dict:
    """Write `image.onnx` and `text.onnx` of an fp32 model into `out_dir`; returns {tower: file name}.

    The example inputs only fix what is static (channels, image size); batch and sequence length are
    exported as dynamic dimensions `batch` and `sequence`.
    """
    from PIL import Image

    from data_tools.collate import encode_captions, preprocess_images

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    # Example inputs: two gray images the processor prepares (its size), two captions of different length.
    pixels = preprocess_images(processor, [Image.new("RGB", (64, 64), (128, 128, 128))] * 2)  # (2, 3, H, W)
    tokens = encode_captions(processor, ["a photo", "a photo of something larger"], 77)
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    towers = {
        "image": (ImageTower(model).eval(), (pixels,), IMAGE_INPUTS, ({0: batch},)),
        "text": (
            TextTower(model).eval(),
            (tokens["input_ids"], tokens["attention_mask"]),
            TEXT_INPUTS,
            ({0: batch, 1: sequence}, {0: batch, 1: sequence}),
        ),
    }
    with _quiet_exporter(), torch.no_grad():
        for name, (module, args, inputs, dynamic) in towers.items():
            torch.onnx.export(
                module,
                args,
                str(out / TOWER_FILES[name]),
                input_names=list(inputs),
                output_names=[OUTPUTS[name]],
                dynamic_shapes=dynamic,
                opset_version=opset,
                dynamo=True,
                verbose=False,
                external_data=_parameter_bytes(model) > EXTERNAL_DATA_BYTES,
            )
    return dict(TOWER_FILES)


def quantize_towers_int8(onnx_dir: str | os.PathLike) -> dict:
    """`image.int8.onnx` and `text.int8.onnx` beside the fp32 graphs; returns {tower: file name}."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    onnx_dir = Path(onnx_dir)
    with _quiet_exporter():  # quantize_dynamic logs a pre-processing suggestion on the root logger
        for name, fp32 in TOWER_FILES.items():
            src = onnx_dir / fp32
            quantize_dynamic(
                src,
                onnx_dir / INT8_FILES[name],
                weight_type=QuantType.QInt8,
                per_channel=True,
                use_external_data_format=(onnx_dir / f"{fp32}.data").exists(),
            )
    return dict(INT8_FILES)


def graph_opset(path: str | os.PathLike) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return next(int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx"))


# ----------------------------------------------------------------------------- parity on an eval set


def embed_set(embedders: dict, rset, batch_size: int) -> dict:
    """Every readable image and every distinct caption of a RetrievalSet, embedded by each embedder.

    Images are decoded one batch at a time (never the whole set in memory) and each batch goes to every
    embedder; unreadable images are dropped with their captions, and each distinct caption text is
    embedded once, as `finetune.evaluation.evaluate` does.

    Returns:
        {"images": {name: (N_img, D)}, "texts": {name: (N_distinct, D)}, "distinct": [str] (N_distinct,),
         "text_rows": (N_txt,) caption -> distinct text, "text_to_image": (N_txt,) caption -> readable image,
         "sample_images": the first <= 256 readable images (PIL), for the throughput measurement}
    """
    from tqdm.auto import tqdm

    from data_tools.loading import decode_image

    image_parts = {name: [] for name in embedders}
    valid, sample = [], []
    for start in tqdm(range(0, rset.num_images, batch_size), desc="ONNX parity: images", leave=False):
        decoded = [decode_image(rset.images[i]) for i in range(start, min(start + batch_size, rset.num_images))]
        good = [im for im in decoded if im is not None]
        valid.extend(im is not None for im in decoded)
        sample.extend(good[: max(0, 256 - len(sample))])
        if good:
            for name, embedder in embedders.items():
                image_parts[name].append(embedder.embed_images(good))
    valid = np.asarray(valid, dtype=bool)
    if not valid.any():
        raise ExportError(f"the target eval set: none of its {rset.num_images} images can be read")
    keep = valid[rset.text_to_image]  # (N_txt,) captions of readable images
    captions = [c for c, k in zip(rset.captions, keep) if k]
    distinct = list(dict.fromkeys(captions))
    position = {t: i for i, t in enumerate(distinct)}
    text_parts = {name: [] for name in embedders}
    for start in tqdm(range(0, len(distinct), batch_size), desc="ONNX parity: captions", leave=False):
        for name, embedder in embedders.items():
            text_parts[name].append(embedder.embed_texts(distinct[start : start + batch_size]))
    renumber = np.cumsum(valid) - 1
    return {
        "images": {name: np.concatenate(parts) for name, parts in image_parts.items()},
        "texts": {name: np.concatenate(parts) for name, parts in text_parts.items()},
        "distinct": distinct,
        "text_rows": torch.as_tensor([position[c] for c in captions], dtype=torch.int64),
        "text_to_image": torch.from_numpy(renumber[rset.text_to_image[keep]].astype(np.int64)),
        "sample_images": sample,
    }


def row_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of `a` with the same row of `b` (a zero row scores 0, a NaN row NaN). # (N,)"""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return (a * b).sum(axis=1)


def cosine_summary(image_cos: np.ndarray, text_cos: np.ndarray) -> dict:
    return {
        "image_min_cosine": float(image_cos.min()),
        "image_mean_cosine": float(image_cos.mean()),
        "text_min_cosine": float(text_cos.min()),
        "text_mean_cosine": float(text_cos.mean()),
        "min_cosine": float(min(image_cos.min(), text_cos.min())),
    }


def parity_gate(summary: dict, image_cos: np.ndarray, text_cos: np.ndarray, distinct: list[str], *, min_cosine: float) -> None:
    """Raises OnnxParityError naming the worst rows when any row's cosine is below `min_cosine`."""
    bad = []
    for what, cos, names in (("image", image_cos, None), ("caption", text_cos, distinct)):
        for i in np.flatnonzero(~(cos >= min_cosine))[:3]:  # NaN fails too
            bad.append(f"{what} {i}" + (f" {names[i]!r}" if names else "") + f": {cos[i]:.6f}")
    if bad:
        raise OnnxParityError(
            f"ONNX parity: the fp32 ONNX towers do not reproduce the PyTorch embeddings on the target eval set "
            f"(min cosine image {summary['image_min_cosine']:.6f}, text {summary['text_min_cosine']:.6f}; every row must be "
            f">= {min_cosine}). Worst rows: {'; '.join(bad)}. Nothing was written."
        )


def int8_gate(reference: dict, candidate: dict, *, max_r1_drop: float) -> dict:
    drops = r1_drops(reference, candidate)
    failed = {d: v for d, v in drops.items() if v > max_r1_drop}
    if failed:
        detail = ", ".join(
            f"{d} R@1 {reference['target'][d]['R@1']:.2f} -> {candidate['target'][d]['R@1']:.2f} (-{v:.2f})" for d, v in failed.items()
        )
        raise OnnxParityError(
            f"quality gate: the ONNX int8 towers lose more target R@1 than export.max_r1_drop={max_r1_drop} points allow: "
            f"{detail}. Nothing was written; export with --onnx (fp32 graphs), or raise export.max_r1_drop if that loss is acceptable."
        )
    return drops


def _file_entry(onnx_dir: Path, name: str) -> dict:
    entry = {"file": name, "path": f"{ONNX_DIR}/{name}", "bytes": (onnx_dir / name).stat().st_size, "sha256": file_sha256(onnx_dir / name)}
    data = onnx_dir / f"{name}.data"
    if data.exists():
        entry["external_data"] = {"file": data.name, "bytes": data.stat().st_size, "sha256": file_sha256(data)}
    return entry


def build_onnx(
    model: nn.Module,
    processor,
    rset,
    onnx_dir: str | os.PathLike,
    *,
    max_text_length: int,
    batch_size: int,
    int8: bool,
    max_r1_drop: float,
    ks: tuple[int, ...] = (1, 5, 10),
    min_cosine: float = MIN_COSINE,
    log=print,
) -> tuple[dict, dict]:
    """Export, check and (optionally) quantize the towers of an fp32 model into `onnx_dir`.

    Parity: every image and every distinct caption of `rset` (the target eval set) is embedded by PyTorch
    and by the fp32 graphs; any row below `min_cosine` raises OnnxParityError. int8: its target R@1 is
    compared with the PyTorch fp32 model's on the same embeddings path (`export.max_r1_drop`).

    Returns:
        (the manifest's "onnx" entry, {"onnx_fp32": results, "onnx_int8": results} on the target set).
    """
    from finetune.evaluation.metrics import retrieval_metrics

    onnx_dir = Path(onnx_dir)
    started = time.perf_counter()
    export_towers(model, processor, onnx_dir)
    export_seconds = time.perf_counter() - started
    threads = default_threads()
    towers = {"fp32": TOWER_FILES}
    if int8:
        towers["int8"] = quantize_towers_int8(onnx_dir)
    embedders = {"pytorch_fp32": TorchEmbedder(model.float(), processor, max_text_length, batch_size=batch_size)}
    for kind, files in towers.items():
        embedders[f"onnx_{kind}"] = OnnxEmbedder.from_graphs(
            onnx_dir, files, processor, max_text_length, batch_size=batch_size, num_threads=threads
        )
    emb = embed_set(embedders, rset, batch_size)
    distinct = emb["distinct"]

    def results_of(name: str) -> dict:
        text_emb = torch.from_numpy(emb["texts"][name])[emb["text_rows"]]  # (N_txt, D)
        image_emb = torch.from_numpy(emb["images"][name])  # (N_img, D)
        return {"target": retrieval_metrics(image_emb, text_emb, emb["text_to_image"], ks=ks)}

    ref_images, ref_texts = emb["images"]["pytorch_fp32"], emb["texts"]["pytorch_fp32"]
    torch_results = results_of("pytorch_fp32")
    parity, results = {}, {}
    for kind in towers:
        name = f"onnx_{kind}"
        image_cos, text_cos = row_cosines(emb["images"][name], ref_images), row_cosines(emb["texts"][name], ref_texts)
        summary = cosine_summary(image_cos, text_cos)
        if kind == "fp32":
            parity_gate(summary, image_cos, text_cos, distinct, min_cosine=min_cosine)
        results[name] = results_of(name)
        summary["r1_delta_points_vs_pytorch_fp32"] = {  # candidate - PyTorch fp32, t2i first
            d: 0.0 - v for d, v in sorted(r1_drops(torch_results, results[name]).items(), reverse=True)
        }
        parity[kind] = summary
    if int8:
        int8_gate(torch_results, results["onnx_int8"], max_r1_drop=max_r1_drop)
        log(
            "ONNX int8 quality gate passed: target R@1 vs PyTorch fp32 "
            + ", ".join(f"{d} {v:+.2f}" for d, v in parity["int8"]["r1_delta_points_vs_pytorch_fp32"].items())
            + f" points (largest drop allowed: {max_r1_drop}); min cosine {parity['int8']['min_cosine']:.4f}"
        )
    log(
        f"ONNX parity passed: fp32 graphs vs PyTorch, min cosine {parity['fp32']['min_cosine']:.6f} over "
        f"{len(ref_images)} images and {len(distinct)} captions (floor {min_cosine})"
    )

    speed = onnx_throughput(model, processor, emb["sample_images"], distinct[:256], onnx_dir, towers, max_text_length, threads)
    entry = {
        "exporter": EXPORTER,
        "torch_version": torch.__version__,
        "opset": graph_opset(onnx_dir / TOWER_FILES["image"]),
        "inputs": {"image": list(IMAGE_INPUTS), "text": list(TEXT_INPUTS)},
        "outputs": dict(OUTPUTS),
        "dynamic_axes": {
            "pixel_values": {"0": "batch"},
            "input_ids": {"0": "batch", "1": "sequence"},
            "attention_mask": {"0": "batch", "1": "sequence"},
        },
        "output_normalised": True,
        "files": {kind: {n: _file_entry(onnx_dir, f) for n, f in files.items()} for kind, files in towers.items()},
        "parity": {"eval_set": "target", "images": len(ref_images), "captions": len(distinct), "min_cosine_required": min_cosine, **parity},
        "threads": threads,
        "throughput": speed,
        "export_seconds": round(export_seconds, 2),
    }
    if int8:
        entry["int8"] = {"method": INT8_METHOD, "max_r1_drop": max_r1_drop}
    return entry, results


# ----------------------------------------------------------------------------- throughput


def onnx_throughput(
    model, processor, images: list, captions: list[str], onnx_dir, towers: dict, max_text_length: int, threads: int, *, repeats: int = 5
) -> dict:
    """Images/s and captions/s of PyTorch fp32 and each ONNX variant on the same preprocessed batch, side
    by side (each repeat times every variant in turn), with `threads` threads for all of them."""
    from data_tools.collate import encode_captions, preprocess_images

    pixels = preprocess_images(processor, images)  # (B, 3, H, W)
    tokens = encode_captions(processor, captions, max_text_length)
    ids, mask = tokens["input_ids"], tokens["attention_mask"]
    image_tower, text_tower = ImageTower(model).eval(), TextTower(model).eval()
    sessions = {f"onnx_{kind}": OnnxTowers(onnx_dir, files, num_threads=threads) for kind, files in towers.items()}
    pix_np, ids_np, mask_np = pixels.numpy(), ids.numpy(), mask.numpy()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runners = {"pytorch_fp32": (lambda: image_tower(pixels), lambda: text_tower(ids, mask))}
        for name, s in sessions.items():
            runners[name] = (lambda s=s: s.image_embeddings(pix_np), lambda s=s: s.text_embeddings(ids_np, mask_np))
        return measure_side_by_side(runners, len(pixels), len(ids), repeats=repeats)
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def measure_side_by_side(runners: dict, n_images: int, n_captions: int, *, repeats: int) -> dict:
    """{name: {images_per_s, captions_per_s}}: medians of `repeats` timings, the variants taking turns."""
    fns = {}
    for name, (embed_images, embed_texts) in runners.items():
        fns[f"{name}/image"], fns[f"{name}/text"] = embed_images, embed_texts
    times = side_by_side(fns, repeats=repeats)
    timings = {name: {"image": times[f"{name}/image"], "text": times[f"{name}/text"]} for name in runners}
    return {
        name: {
            "images_per_s": round(n_images / statistics.median(t["image"]), 1),
            "captions_per_s": round(n_captions / statistics.median(t["text"]), 1),
        }
        for name, t in timings.items()
    }


def format_onnx_summary(entry: dict) -> str:
    """The lines `domainclip export --onnx` prints after the results table."""
    parity, speed, base = entry["parity"], entry["throughput"], entry["throughput"]["pytorch_fp32"]
    lines = []
    for kind in entry["files"]:
        p = parity[kind]
        size = sum(f["bytes"] for f in entry["files"][kind].values())
        r1 = ", ".join(
            f"{d} {p['r1_delta_points_vs_pytorch_fp32'][d]:+.2f}" for d in ("t2i", "i2t") if d in p["r1_delta_points_vs_pytorch_fp32"]
        )
        s = speed[f"onnx_{kind}"]
        lines.append(
            f"ONNX {kind}: min cosine vs PyTorch image {p['image_min_cosine']:.6f} text {p['text_min_cosine']:.6f}; "
            f"target R@1 vs PyTorch {r1}; {size / 1e6:.2f} MB; throughput vs PyTorch fp32 "
            f"x{s['images_per_s'] / base['images_per_s']:.2f} images ({s['images_per_s']:.0f}/s), "
            f"x{s['captions_per_s'] / base['captions_per_s']:.2f} captions ({s['captions_per_s']:.0f}/s)"
        )
    lines.append(
        f"PyTorch fp32: {base['images_per_s']:.0f} images/s, {base['captions_per_s']:.0f} captions/s "
        f"(side by side, {entry['threads']} threads, opset {entry['opset']})"
    )
    return "\n".join(lines)


def remove_tree(path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
