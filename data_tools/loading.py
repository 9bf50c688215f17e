"""Load image-caption data from real formats into one normal form.

Whatever the source (a hub dataset id, a local folder of parquet files, an imagefolder with
metadata, a CSV of paths, or a generated synthetic domain) the result is a `datasets.Dataset`
with one row per (image, caption) pair:

    image        undecoded image ({"bytes", "path"}); decoded lazily so a corrupt file is skipped
    caption      str
    image_index  int64, 0..N_images-1; rows sharing it are captions of the same image
    label        str, only when a label column is configured

Decoding happens in the collator (`decode_image`), which counts and skips images PIL cannot read.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools.synthetic import generate_domain


class DataLoadError(RuntimeError):
    """A dataset could not be loaded or does not have the configured columns."""


def offline_note() -> str:
    """A sentence to append to load errors when the Hugging Face offline switches are on (read at call time)."""
    flags = [os.environ.get(name, "").lower() for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")]
    if not any(flag in ("1", "true", "yes", "on") for flag in flags):
        return ""
    return " The machine is offline (HF_HUB_OFFLINE is set): only local folders and the cache can be used."


def load_image_text_dataset(
    *,
    key: str,
    path: str | None = None,
    name: str | None = None,
    revision: str | None = None,
    data_files=None,
    split: str = "train",
    image_column: str = "image",
    caption_column: str = "caption",
    image_id_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    synthetic: dict | None = None,
) -> datasets.Dataset:
    """Load one split into the normal form above. `key` is the recipe key, quoted in every error."""
    if synthetic is not None:
        raw = datasets.Dataset.from_dict(
            generate_domain(**synthetic),
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "caption": datasets.List(datasets.Value("string")),
                    "image_id": datasets.Value("string"),
                    "label": datasets.Value("string"),
                }
            ),
        )
        where = f"synthetic {synthetic['domain']} domain"
    else:
        where = f"{path!r} (split {split!r})"
        try:
            raw = datasets.load_dataset(path, name, data_files=data_files, split=split, revision=revision)
        except Exception as exc:  # datasets raises many types; the user needs the key and the cause
            raise DataLoadError(
                f"{key}.path: could not load dataset {where}: {type(exc).__name__}: {exc}.{offline_note()}"
            ) from exc

    columns = {
        f"{key}.image_column": image_column,
        f"{key}.caption_column": caption_column,
        f"{key}.image_id_column": image_id_column,
        f"{key}.label_column": label_column,
    }
    missing = [f"{k}: column {v!r} not in {where}" for k, v in columns.items() if v and v not in raw.column_names]
    if missing:
        raise DataLoadError("; ".join(missing) + f". Columns there: {', '.join(raw.column_names)}")

    if max_samples is not None:
        raw = raw.select(range(min(max_samples, len(raw))))
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))

    keep = [c for c in (image_column, caption_column, image_id_column, label_column) if c]
    raw = raw.select_columns(list(dict.fromkeys(keep)))
    ids = raw[image_id_column] if image_id_column else list(range(len(raw)))
    # Factorize ids in order of first appearance: rows of one image share one integer.
    _, first_index, inverse = np.unique(np.asarray([str(i) for i in ids]), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_index))
    image_index = order[inverse].astype(np.int64)

    def explode(batch, indices):
        out = {"image": [], "caption": [], "image_index": []}
        if label_column:
            out["label"] = []
        for row, i in enumerate(indices):
            captions = batch[caption_column][row]
            captions = [captions] if isinstance(captions, str) else list(captions or [])
            for caption in captions:
                if not isinstance(caption, str) or not caption.strip():
                    continue
                out["image"].append(batch[image_column][row])
                out["caption"].append(caption)
                out["image_index"].append(int(image_index[i]))
                if label_column:
                    out["label"].append(str(batch[label_column][row]))
        return out

    features = {
        "image": raw.features[image_column] if isinstance(raw.features[image_column], datasets.Image) else None,
        "caption": datasets.Value("string"),
        "image_index": datasets.Value("int64"),
    }
    if label_column:
        features["label"] = datasets.Value("string")
    normal = raw.map(
        explode,
        batched=True,
        with_indices=True,
        remove_columns=raw.column_names,
        features=datasets.Features(features) if features["image"] is not None else None,
        desc=f"Normalizing {key}",
    )
    if len(normal) == 0:
        raise DataLoadError(f"{key}: no (image, caption) rows in {where}")
    return normal


def decode_image(value) -> Image.Image | None:
    """PIL image in RGB, or None when the bytes/path cannot be read (the caller skips and counts it)."""
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict):
            if value.get("bytes") is not None:
                image = Image.open(io.BytesIO(value["bytes"]))
            else:
                image = Image.open(value["path"])
        elif isinstance(value, (str, os.PathLike)):
            image = Image.open(value)
        elif isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        else:
            return None
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


@dataclass
class RetrievalSet:
    """An eval split regrouped for retrieval: unique images and all captions, with the caption->image map."""

    images: list  # undecoded image values, one per unique image
    captions: list[str]
    text_to_image: np.ndarray  # (N_txt,) index into images

    @classmethod
    def from_pairs(cls, pairs: datasets.Dataset) -> "RetrievalSet":
        index = np.asarray(pairs["image_index"])
        _, first_row = np.unique(index, return_index=True)
        remap = {int(index[r]): k for k, r in enumerate(sorted(first_row))}
        rows = sorted(first_row.tolist())
        images = pairs.select(rows)["image"]  # one columnar read, not a row fetch per image
        return cls(
            images=images,
            captions=list(pairs["caption"]),
            text_to_image=np.asarray([remap[int(i)] for i in index], dtype=np.int64),
        )
