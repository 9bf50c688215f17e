"""`domainclip search`: text -> image, image -> image, image -> text and fused image + text queries.

The model is the export named in the index manifest, checked against it (embedding size and the
weights' sha256), so an index is never queried with a model that did not build it. A fused query is
w * image + (1 - w) * text of the two L2-normalised embeddings, normalised again. Query embeddings
are kept in a small LRU cache (texts by string, images by path, size and mtime). The model is reached
through an embedder (finetune/retrieval/embedders.py), the same one `domainclip serve` batches requests for.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from finetune.errors import ExportError
from finetune.retrieval.index import apply_search_params, read_index_manifest


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
        value = compute()
        self.put(key, value)
        return value

    def lookup(self, key):
        """The cached value (counted as a hit) or None (counted as a miss); `put` stores it after."""
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key, value) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        if len(self.items) > self.size:
            self.items.popitem(last=False)

    def stats(self) -> dict:
        asked = self.hits + self.misses
        return {
            "size": self.size,
            "entries": len(self.items),
            "hits": self.hits,
            "misses": self.misses,
            "hit_rate": round(self.hits / asked, 4) if asked else None,
        }


class Searcher:
    """An index folder with the export that built it. `embedder` (optional) replaces loading the
    export named in the manifest (e.g. an ONNX one from `load_embedder`); it is checked the same way."""

    def __init__(self, index_dir, *, cache_size: int = 256, backend: str = "torch", embedder=None):
        from finetune.retrieval.embedders import load_embedder

        self.index_dir = Path(index_dir)
        self.manifest = read_index_manifest(index_dir)
        export_dir = self.manifest["export_dir"]
        if embedder is None:
            if not Path(export_dir).is_dir():
                raise ExportError(f"{self.index_dir}/manifest.json names export {export_dir}, which does not exist")
            embedder = load_embedder(export_dir, backend)
        self.embedder = embedder
        export_manifest = self.export_manifest = embedder.manifest
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
        self.indexes, self.id_maps = {}, {}
        for kind, entry in self.manifest["indexes"].items():
            index = faiss.read_index(str(self.index_dir / entry["file"]))
            if index.d != self.manifest["embedding_dim"]:
                raise ExportError(f"{entry['file']}: {index.d} dims, manifest says {self.manifest['embedding_dim']}")
            apply_search_params(index, entry["search_params"])
            self.indexes[kind] = index
            self.id_maps[kind] = pd.read_parquet(self.index_dir / entry["id_map"])
        self.cache = LRUCache(cache_size)
        self._as_text = {}  # (kind, field) -> the id-map column as str, for filters

    def embed_text(self, text: str) -> np.ndarray:
        return self.cache.get(("text", text), lambda: self.embedder.embed_texts([text])[0])  # (D,)

    def embed_image(self, path: str | os.PathLike) -> np.ndarray:
        from data_tools.loading import decode_image

        stat = os.stat(path) if os.path.exists(path) else None
        if stat is None:
            raise ExportError(f"--image: {path} does not exist")

        def compute():
            image = decode_image(str(path))
            if image is None:
                raise ExportError(f"--image: {path} is not an image PIL can read")
            return self.embedder.embed_images([image])[0]  # (D,)

        return self.cache.get(("image", str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns), compute)

    def query_vector(self, text: str | None, image: str | None, weight: float) -> tuple[np.ndarray, str]:
        if text is not None and image is not None:
            if not 0 <= weight <= 1:
                raise ExportError(f"--weight must be within 0..1, got {weight}")
            return fuse(self.embed_image(image), self.embed_text(text), weight), f"fused (image weight {weight:g})"
        if text is not None:
            return self.embed_text(text), "text"
        return self.embed_image(image), "image"

    def resolve_against(self, against: str | None) -> str:
        """The index a query searches: `against`, or image when built (else text)."""
        against = against or ("image" if "image" in self.indexes else "text")
        if against not in self.indexes:
            raise ExportError(f"this index holds {', '.join(self.indexes)} vectors only; rebuild with --modality {against} or both")
        return against

    def filter_fields(self, against: str) -> list[str]:
        """Id-map fields a filter may name (those with at least one value)."""
        id_map = self.id_maps[against]
        return [c for c in id_map.columns if c != "vector_row" and id_map[c].notna().any()]

    def filter_mask(self, against: str, filters: dict) -> np.ndarray:
        """(N,) bool: id-map rows whose fields equal the filter values (a list = any of them; compared as text).

        Raises ExportError naming a field that is not in the id map, with the ones that are."""
        allowed = self.filter_fields(against)
        id_map = self.id_maps[against]
        mask = np.ones(len(id_map), dtype=bool)
        for field, wanted in filters.items():
            if field not in allowed:
                raise ExportError(f"filters.{field}: not a field of the {against} id map; filter on one of {', '.join(allowed)}")
            if (against, field) not in self._as_text:  # once per field: a column as text
                self._as_text[against, field] = id_map[field].astype(str).to_numpy()
            values = wanted if isinstance(wanted, list) else [wanted]
            mask &= np.isin(self._as_text[against, field], [str(v) for v in values])
        return mask

    def search_vector(self, vector: np.ndarray, *, k: int, against: str, filters: dict | None = None) -> list[dict]:
        """Top-k hits of one unit query vector (D,), each {"rank", "score", **id map fields}.

        With filters, FAISS is asked for more neighbours than k (4k, then doubling) until k of them pass
        the filters or every vector was reached: post-filtering, which works for every index type
        (Flat, IVF, IVF-SQ, OPQ+IVF+PQ alike); an IVF index only reaches the vectors of its nprobe lists."""
        index, id_map = self.indexes[against], self.id_maps[against]
        query = np.ascontiguousarray(vector[None], dtype=np.float32)  # (1, D)
        mask = self.filter_mask(against, filters) if filters else None
        if mask is None:
            scores, rows = index.search(query, min(k, index.ntotal))
            pairs = [(s, r) for s, r in zip(scores[0], rows[0]) if r >= 0]  # r < 0: fewer than k vectors reachable
        else:
            fetch = min(4 * k, index.ntotal)
            while True:
                scores, rows = index.search(query, fetch)
                pairs = [(s, r) for s, r in zip(scores[0], rows[0]) if r >= 0 and mask[r]]
                reached = int((rows[0] >= 0).sum())
                if len(pairs) >= k or fetch >= index.ntotal or reached < fetch:
                    break
                fetch = min(2 * fetch, index.ntotal)
            pairs = pairs[:k]
        hits = []
        for rank, (score, row) in enumerate(pairs, start=1):
            record = {k_: _plain(v) for k_, v in id_map.iloc[int(row)].items()}
            hits.append({"rank": rank, "score": round(float(score), 4), **record})
        return hits

    def search(
        self, *, text=None, image=None, weight: float = 0.5, k: int = 10, against: str | None = None, filters: dict | None = None
    ) -> dict:
        """{"query": ..., "against": "image"|"text", "hits": [{"rank", "score", **id map fields}]}."""
        if text is None and image is None:
            raise ExportError("give a text, an image, or both")
        against = self.resolve_against(against)
        vector, kind = self.query_vector(text, image, weight)
        hits = self.search_vector(vector, k=k, against=against, filters=filters)
        return {"query": {"kind": kind, "text": text, "image": image}, "against": against, "hits": hits}


def fuse(image_vector: np.ndarray, text_vector: np.ndarray, weight: float) -> np.ndarray:
    """w * image + (1 - w) * text of two unit vectors (D,), normalised again."""
    fused = weight * image_vector + (1 - weight) * text_vector
    return (fused / np.linalg.norm(fused)).astype(np.float32)


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
