"""`domainclip index`: embed a corpus with an export, build FAISS inner-product indexes, tune, write.

One index per modality (`image.faiss`, `text.faiss`), so a text query never has to wade through
captions to find images. Vectors are L2-normalised: inner product = cosine.

Which index (`choose_factory`, from corpus size and the memory budget for the index):
  * fewer than EXACT_BELOW vectors: `Flat`, exact search (brute force is then faster than any tuning);
  * raw float32 vectors fit the budget: `IVF{nlist},Flat`, nlist ~ 4 sqrt(n): exact distances inside
    the probed lists, one knob (nprobe), trains in seconds, adds vectors without retraining;
  * they do not, but scalar codes do: `IVF{nlist},SQ{8|6|4}`, the most bits per dimension that fit.
    faiss encodes each vector's residual from its list's centroid, whose range is a fraction of the
    vector's, so 6 bits keep the ranking of near-duplicates that 4-bit codes of the whole vector
    scramble (benchmark, 1M x 512 clustered: recall@10 0.972 at 0.196x flat's bytes, against 0.869
    for fast-scan PQ candidates re-ranked with 4-bit whole-vector codes);
  * not even 4-bit codes fit: `OPQ{m},IVF{nlist},PQ{m}`: m bytes per vector, the rotation keeps PQ's
    error low.
The factory string goes to faiss's own `index_factory`, and nprobe is set through faiss's
`ParameterSpace`. autofaiss (a well-kept selector) was tried first: it does not install beside this
toolkit (it pins numpy < 2 and pandas < 3), so the rules above stay small and explicit instead.

Tuning: recall@10 of the approximate index against exact search on held-out queries (the other
modality's embeddings: captions for an image index, images for a text index), nprobe doubled until
`target_recall` is met; the operating point, the curve and latency p50/p99 at batch 1 go into
manifest.json. With several processes (`accelerate launch`), each embeds its shard and the main
process builds and writes.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from pathlib import Path

import faiss
import numpy as np
import torch
import yaml

from finetune.io import atomic_write_bytes, atomic_write_text
from finetune.runfolder import MANIFEST

FORMAT = "domainclip-index/1"
EXACT_BELOW = 4096
SCALAR_BITS = (8, 6, 4)  # scalar code widths tried, most accurate first
KINDS = ("image", "text")
UNREADABLE_LISTED = 20  # unreadable corpus images named in the manifest
_UNITS = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_bytes(text: str) -> int:
    match = re.fullmatch(r"\s*([\d.]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        from finetune.errors import ExportError

        raise ExportError(f"--memory-budget: expected a size like 512MB or 2GB, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


# ----------------------------------------------------------------------------- choosing and tuning


def choose_factory(n: int, dim: int, memory_budget: int) -> tuple[str, str]:
    """(faiss index_factory string, why) for n vectors of `dim` floats within `memory_budget` bytes."""
    if n < EXACT_BELOW:
        return "Flat", f"{n} vectors < {EXACT_BELOW}: exact search"
    nlist = int(min(max(16, 2 ** round(math.log2(4 * math.sqrt(n)))), max(16, n // 39)))
    flat_bytes = n * (dim * 4 + 8) + nlist * dim * 4  # vectors + ids + centroids
    if flat_bytes <= memory_budget:
        return f"IVF{nlist},Flat", f"raw vectors ({flat_bytes / 1e6:.1f} MB) fit the budget ({memory_budget / 1e6:.0f} MB)"
    # Residual scalar codes: dim * bits / 8 bytes + an 8-byte id per vector, plus the centroids. Up to
    # 4x fewer lists (down to ~sqrt(n)) make room for wider codes: more accuracy for a little speed.
    for bits in SCALAR_BITS:
        for lists in (nlist, nlist // 2, nlist // 4):
            sq_bytes = n * (dim * bits // 8 + 8) + lists * dim * 4
            if dim * bits % 8 == 0 and lists >= 16 and sq_bytes <= memory_budget:
                return (
                    f"IVF{lists},SQ{bits}",
                    f"raw vectors ({flat_bytes / 1e6:.1f} MB) exceed the budget ({memory_budget / 1e6:.0f} MB): "
                    f"{bits}-bit residual scalar codes ({sq_bytes / 1e6:.1f} MB)",
                )
    per_vector = (memory_budget - nlist * dim * 4 - dim * dim * 4) / n - 8  # bytes left per code
    m = max((m for m in range(1, dim + 1) if dim % m == 0 and m <= per_vector), default=None)
    if m is None or m < 4:
        from finetune.errors import ExportError

        raise ExportError(
            f"--memory-budget: {memory_budget / 1e6:.0f} MB cannot hold {n} vectors even as 4-byte PQ codes "
            f"(needs about {(n * 12 + nlist * dim * 4) / 1e6:.0f} MB)"
        )
    return (
        f"OPQ{m},IVF{nlist},PQ{m}",
        f"raw vectors ({flat_bytes / 1e6:.1f} MB) exceed the budget ({memory_budget / 1e6:.0f} MB): {m}-byte OPQ codes",
    )


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    return exact.search(queries, k)[1]


def recall_at(index, queries: np.ndarray, truth: np.ndarray, k: int = 10) -> float:
    """Fraction of the exact top-k that the index returns in its top-k (averaged over queries)."""
    found = index.search(queries, k)[1]
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth))
    return hits / truth.size


def build_index(vectors: np.ndarray, queries: np.ndarray, *, memory_budget: int, target_recall: float, seed: int = 0) -> tuple:
    """(faiss index, manifest entry) over L2-normalised `vectors` (n, d), tuned on `queries` (q, d)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    n, dim = vectors.shape
    factory, reason = choose_factory(n, dim, memory_budget)
    started = time.perf_counter()
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        rng = np.random.default_rng(seed)
        sample = vectors[rng.choice(n, size=min(n, 256 * _nlist(factory)), replace=False)]
        index.train(sample)
    index.add(vectors)
    build_seconds = time.perf_counter() - started

    k = min(10, n)
    truth = exact_neighbours(vectors, queries, k)
    params, curve = "", []
    if "IVF" in factory:  # our own factory string: the knob exists exactly when we asked for lists
        space = faiss.ParameterSpace()
        nprobe, nlist = 1, _nlist(factory)
        while True:
            space.set_index_parameter(index, "nprobe", nprobe)
            recall = recall_at(index, queries, truth, k)
            curve.append({"nprobe": nprobe, "recall_at_10": round(recall, 4)})
            plateau = len(curve) >= 3 and curve[-1]["recall_at_10"] <= curve[-3]["recall_at_10"]
            if recall >= target_recall or nprobe >= nlist or plateau:  # plateau: the codes cap recall, not nprobe
                break
            nprobe = min(nprobe * 2, nlist)
        best = next((c for c in curve if c["recall_at_10"] >= target_recall), max(curve, key=lambda c: c["recall_at_10"]))
        space.set_index_parameter(index, "nprobe", best["nprobe"])
        params = f"nprobe={best['nprobe']}"
    recall = recall_at(index, queries, truth, k)
    if recall < target_recall:
        warnings.warn(f"{factory}: best recall@10 {recall:.3f} is below the target {target_recall}", stacklevel=2)
    entry = {
        "factory": factory,
        "selection_reason": reason,
        "index_type": type(faiss.downcast_index(index)).__name__,
        "metric": "inner_product",
        "search_params": params,
        "vectors": int(n),
        "dim": int(dim),
        "recall_at_10": round(recall, 4),
        "target_recall": target_recall,
        "target_met": bool(recall >= target_recall),
        "tuning": curve,
        "tuning_queries": int(len(queries)),
        "latency_ms": latency_at_batch_1(index, queries),
        "build_seconds": round(build_seconds, 3),
    }
    return index, entry


def _nlist(factory: str) -> int:
    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 1


def latency_at_batch_1(index, queries: np.ndarray, k: int = 10, n: int = 200) -> dict:
    times = []
    for i in range(min(n, len(queries)) or 1):
        q = queries[i % len(queries)][None]
        start = time.perf_counter()
        index.search(q, k)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": round(float(np.percentile(times, 50)), 4), "p99": round(float(np.percentile(times, 99)), 4), "queries": len(times)}


def apply_search_params(index, params: str) -> None:
    """Re-apply the tuned operating point ("nprobe=8") on an index read back with faiss.read_index."""
    if params:
        faiss.ParameterSpace().set_index_parameters(index, params)


# ----------------------------------------------------------------------------- corpus


def parse_corpus(text: str):
    """--corpus as (DatasetSpec, template seed): a YAML/JSON mapping (inline or a .yaml/.json file),
    `recipe:PATH[:data.eval.target]` (with the recipe's train.seed, so label-only rows get training's
    captions), or a folder / hub id for load_dataset (seed 0)."""
    from pydantic import ValidationError

    from finetune.config.load import describe_errors, load_config
    from finetune.config.schema import DatasetSpec
    from finetune.config.specs import dataset_specs
    from finetune.errors import ConfigError

    if text.startswith("recipe:"):
        path, _, key = text[len("recipe:") :].partition(":")
        with warnings.catch_warnings():  # notices about training keys say nothing about a corpus
            warnings.simplefilter("ignore", UserWarning)
            cfg = load_config(path)
        specs = dataset_specs(cfg)  # the one recipe -> datasets resolver: eval languages and replay sets too
        if not key:  # the set an export is evaluated on: the target, or the first eval language
            key = "data.eval.target" if "data.eval.target" in specs else next((k for k in specs if k.startswith("data.eval.")), "")
        if key not in specs:
            raise ConfigError(path, [f"--corpus: {key or 'data.eval.target'} is not a dataset of {path}; it names {', '.join(specs)}"])
        return specs[key], cfg.train.seed
    tree = None
    if text.lstrip().startswith("{"):
        tree = yaml.safe_load(text)
    elif Path(text).is_file() and Path(text).suffix in (".yaml", ".yml", ".json"):
        tree = yaml.safe_load(Path(text).read_text())
    if tree is None:
        tree = {"path": text}
    try:
        return DatasetSpec.model_validate(tree), 0
    except ValidationError as exc:
        raise ConfigError("--corpus", describe_errors(exc)) from None


def id_maps(rset, image_valid: np.ndarray) -> dict:
    """{"image": DataFrame, "text": DataFrame}: vector row -> image id, source row, label, caption, image path."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.compute as pc

    column = rset.pairs.with_format("arrow")["image"]  # memory-mapped: bytes are not read
    paths = pc.struct_field(column, "path").to_pylist() if pa.types.is_struct(column.type) else [None] * len(rset.pairs)
    rows = rset.image_rows[image_valid]
    first_caption = {}
    for caption, img in zip(rset.captions, rset.text_to_image):
        first_caption.setdefault(int(img), caption)
    valid_images = np.flatnonzero(image_valid)
    labels = rset.labels
    image = pd.DataFrame(
        {
            "vector_row": np.arange(len(valid_images)),
            "image_id": [rset.image_ids[i] for i in valid_images],
            "source_row": rset.source_rows[valid_images],
            "label": [labels[i] for i in valid_images] if labels else None,
            "caption": [first_caption[int(i)] for i in valid_images],
            "image_path": [paths[int(r)] for r in rows],
        }
    )
    keep = image_valid[rset.text_to_image]
    text_images = rset.text_to_image[keep]
    text = pd.DataFrame(
        {
            "vector_row": np.arange(int(keep.sum())),
            "caption": [c for c, k in zip(rset.captions, keep) if k],
            "image_id": [rset.image_ids[i] for i in text_images],
            "source_row": rset.source_rows[text_images],
            "label": [labels[i] for i in text_images] if labels else None,
            "image_path": [paths[int(rset.image_rows[i])] for i in text_images],
        }
    )
    return {"image": image, "text": text}


def _accelerator():
    """An Accelerator when launched as several processes (accelerate launch / torchrun), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


def index_corpus(
    export_dir,
    corpus: str,
    out_dir,
    *,
    modality: str,
    memory_budget: int,
    target_recall: float,
    batch_size: int,
    num_workers: int = 0,
    max_queries: int = 1000,
) -> dict | None:
    """Embed, index, tune and write; returns the manifest (None on processes other than the main one)."""
    from data_tools.loading import RetrievalSet, load_image_text_dataset
    from finetune.config.specs import dataset_arguments
    from finetune.evaluation.evaluate import embed_retrieval_set
    from finetune.export.merge import load_export

    spec, seed = parse_corpus(corpus)
    accelerator = _accelerator()
    model, processor, export_manifest = load_export(export_dir)
    if accelerator is not None:
        model.to(accelerator.device)
    rset = RetrievalSet.from_pairs(load_image_text_dataset(key="--corpus", **dataset_arguments(spec, seed)))
    started = time.perf_counter()
    emb = embed_retrieval_set(
        model,
        processor,
        rset,
        batch_size=batch_size,
        max_text_length=export_manifest["max_text_length"],
        num_workers=num_workers,
        accelerator=accelerator,
        name="corpus",
        desc="embed corpus",
    )
    embed_seconds = time.perf_counter() - started
    if accelerator is not None and not accelerator.is_main_process:
        return None
    vectors = {
        "image": torch.nn.functional.normalize(emb["image_emb"].float(), dim=-1).numpy(),  # (N_img, D)
        "text": torch.nn.functional.normalize(emb["text_emb"].float(), dim=-1).numpy(),  # (N_txt, D)
    }
    image_valid = emb["image_valid"].numpy()
    maps = id_maps(rset, image_valid)
    unreadable = [rset.image_ids[i] for i in np.flatnonzero(~image_valid)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kinds = KINDS if modality == "both" else (modality,)
    rng = np.random.default_rng(0)
    indexes = {}
    for kind in kinds:
        other = vectors["text" if kind == "image" else "image"]
        queries = other[rng.choice(len(other), size=min(max_queries, len(other)), replace=False)]
        index, entry = build_index(vectors[kind], queries, memory_budget=memory_budget, target_recall=target_recall)
        atomic_write_bytes(out / f"{kind}.faiss", faiss.serialize_index(index).tobytes())
        maps[kind].to_parquet(out / f".{kind}_ids.parquet.tmp", index=False)
        os.replace(out / f".{kind}_ids.parquet.tmp", out / f"{kind}_ids.parquet")
        indexes[kind] = {**entry, "file": f"{kind}.faiss", "id_map": f"{kind}_ids.parquet"}
    manifest = {
        "format": FORMAT,
        "export_dir": str(Path(export_dir).resolve()),
        "model_sha256": export_manifest["weights_sha256"],
        "embedding_dim": export_manifest["embedding_dim"],
        "dtype": export_manifest["dtype"],
        "normalized": True,
        "corpus": spec.model_dump(mode="json", exclude_defaults=True),
        "corrupt_images": emb["corrupt_images"],
        "unreadable_image_ids": unreadable[:UNREADABLE_LISTED],  # the first few, by corpus order
        "embed_seconds": round(embed_seconds, 2),
        "indexes": indexes,
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return manifest


def read_index_manifest(index_dir) -> dict:
    from finetune.errors import ExportError

    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: is {index_dir} a folder written by `domainclip index`?")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest
