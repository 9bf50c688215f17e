"""`domainclip search`: text -> image, image -> image, image -> text and fused image + text queries.

The model is the export named in the index manifest, checked against it (embedding size and the
weights' sha256), so an index is never queried with a model that did not build it. A fused query is
w * image + (1 - w) * text of the two L2-normalised embeddings, normalised again. Query embeddings
are kept in a small LRU cache (texts by string, images by path, size and mtime).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import faiss
import numpy as np
import pandas as pd
import torch

from finetune.export.index import apply_search_params, read_index_manifest
from finetune.export.merge import ExportError


class LRUCache:
    def __init__(self, size: int):
        self.size, self.items = size, OrderedDict()
        self.hits = self.misses = 0

    def get(self, key, compute):
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        value = self.items[key] = compute()
        if len(self.items) > self.size:
            self.items.popitem(last=False)
        return value


class Searcher:
    def __init__(self, index_dir, *, cache_size: int = 256):
        from finetune.export.exporter import load_export

        self.index_dir = Path(index_dir)
        self.manifest = read_index_manifest(index_dir)
        export_dir = self.manifest["export_dir"]
        if not Path(export_dir).is_dir():
            raise ExportError(f"{self.index_dir}/manifest.json names export {export_dir}, which does not exist")
        self.model, self.processor, export_manifest = load_export(export_dir)
        problems = []
        if export_manifest["weights_sha256"] != self.manifest["model_sha256"]:
            problems.append(
                f"model hash {export_manifest['weights_sha256'][:12]} != {self.manifest['model_sha256'][:12]} the index was built with"
            )
        if export_manifest["embedding_dim"] != self.manifest["embedding_dim"]:
            problems.append(f"model embeds {export_manifest['embedding_dim']} dims, the index holds {self.manifest['embedding_dim']}")
        if problems:
            raise ExportError(
                f"index {self.index_dir} does not match export {export_dir}: {'; '.join(problems)}. Rebuild the index "
                "with `domainclip index` for this export."
            )
        self.max_text_length = export_manifest["max_text_length"]
        self.indexes, self.id_maps = {}, {}
        for kind, entry in self.manifest["indexes"].items():
            index = faiss.read_index(str(self.index_dir / entry["file"]))
            if index.d != self.manifest["embedding_dim"]:
                raise ExportError(f"{entry['file']}: {index.d} dims, manifest says {self.manifest['embedding_dim']}")
            apply_search_params(index, entry["search_params"])
            self.indexes[kind] = index
            self.id_maps[kind] = pd.read_parquet(self.index_dir / entry["id_map"])
        self.cache = LRUCache(cache_size)

    @torch.no_grad()
    def embed_text(self, text: str) -> np.ndarray:
        from finetune.collate import encode_captions
        from finetune.towers import text_features

        def compute():
            tokens = encode_captions(self.processor, [text], self.max_text_length)
            emb = text_features(self.model, tokens["input_ids"], tokens["attention_mask"]).float()
            return torch.nn.functional.normalize(emb, dim=-1)[0].numpy()  # (D,)

        return self.cache.get(("text", text), compute)

    @torch.no_grad()
    def embed_image(self, path: str | os.PathLike) -> np.ndarray:
        from data_tools.loading import decode_image
        from finetune.collate import preprocess_images
        from finetune.towers import image_features

        stat = os.stat(path) if os.path.exists(path) else None
        if stat is None:
            raise ExportError(f"--image: {path} does not exist")

        def compute():
            image = decode_image(str(path))
            if image is None:
                raise ExportError(f"--image: {path} is not an image PIL can read")
            emb = image_features(self.model, preprocess_images(self.processor, [image])).float()
            return torch.nn.functional.normalize(emb, dim=-1)[0].numpy()  # (D,)

        return self.cache.get(("image", str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns), compute)

    def query_vector(self, text: str | None, image: str | None, weight: float) -> tuple[np.ndarray, str]:
        if text is not None and image is not None:
            if not 0 <= weight <= 1:
                raise ExportError(f"--weight must be within 0..1, got {weight}")
            fused = weight * self.embed_image(image) + (1 - weight) * self.embed_text(text)
            return fused / np.linalg.norm(fused), f"fused (image weight {weight:g})"
        if text is not None:
            return self.embed_text(text), "text"
        return self.embed_image(image), "image"

    def search(self, *, text=None, image=None, weight: float = 0.5, k: int = 10, against: str | None = None) -> dict:
        """{"query": ..., "against": "image"|"text", "hits": [{"rank", "score", **id map fields}]}."""
        if text is None and image is None:
            raise ExportError("give a text, an image, or both")
        against = against or ("image" if "image" in self.indexes else "text")
        if against not in self.indexes:
            raise ExportError(
                f"this index holds {', '.join(self.indexes)} vectors only; rebuild with --modality {against} or both"
            )
        vector, kind = self.query_vector(text, image, weight)
        scores, rows = self.indexes[against].search(vector[None].astype(np.float32), k)
        id_map = self.id_maps[against]
        hits = []
        for rank, (score, row) in enumerate(zip(scores[0], rows[0]), start=1):
            if row < 0:  # fewer than k vectors reachable
                continue
            record = {k_: _plain(v) for k_, v in id_map.iloc[int(row)].items()}
            hits.append({"rank": rank, "score": round(float(score), 4), **record})
        return {"query": {"kind": kind, "text": text, "image": image}, "against": against, "hits": hits}


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    return value


def format_hits(result: dict) -> str:
    q = result["query"]
    what = " + ".join(x for x in (f"image {q['image']}" if q["image"] else None, f"text {q['text']!r}" if q["text"] else None) if x)
    lines = [f"{q['kind']} query ({what}) -> {result['against']}s"]
    fields = [f for f in ("image_id", "label", "caption", "image_path", "source_row") if result["hits"] and f in result["hits"][0]]
    for hit in result["hits"]:
        cells = ", ".join(f"{f}={hit[f]!r}" if isinstance(hit[f], str) else f"{f}={hit[f]}" for f in fields if hit[f] is not None)
        lines.append(f"{hit['rank']:>3}. {hit['score']:.4f}  {cells}")
    return "\n".join(lines)
