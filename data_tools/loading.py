"""Load image-caption data from real formats into one normal form.

Whatever the source (a hub dataset id, a local folder of parquet files, an imagefolder with
metadata, a CSV of paths, or a generated synthetic domain) the result is a `datasets.Dataset`
with one row per (image, caption) pair:

    image        undecoded image ({"bytes", "path"}); decoded lazily so a corrupt file is skipped
    caption      str
    image_index  int64, 0..N_images-1; rows sharing it are captions of the same image
    source_row   int64, the row of the loaded split (after max_samples) the pair came from
    image_id     str, the image_id_column's value, or the source row as a string
    label        str, only when a label column is configured
    caption_choices  list[str], only for a label-only set (caption_column null + caption_templates):
                 the label written into every template; `caption` holds one of them, and training
                 draws a fresh one per sample per epoch (data_tools/templates.py)

`source_row` and `image_id` are stable: mining, indexing and search point back at the source with
them, while `image_index` only numbers the images of this one load.

Decoding happens in the collator (`decode_image`), which counts and skips images PIL cannot read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError

from data_tools.hub import hub_or_cache, is_hub_lookup, offline_note
from data_tools.synthetic.multilingual import generate_synthetic
from finetune.errors import DataLoadError


@contextlib.contextmanager
def quiet_datasets(enabled: bool = True) -> Iterator[None]:
    """Silence datasets' progress bars and info logging inside the block, then restore them.

    Loading local files or a synthetic set prints "Generating train split" and map bars that say
    nothing to the user; a real hub download keeps its bars (`enabled=False`), where progress matters.
    """
    if not enabled:
        yield
        return
    bars_were_disabled = datasets.utils.are_progress_bars_disabled()
    verbosity = datasets.logging.get_verbosity()
    with warnings.catch_warnings():
        # HF_DATASETS_DISABLE_PROGRESS_BARS=0 in the environment wins; datasets warns about that.
        warnings.simplefilter("ignore")
        datasets.utils.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not bars_were_disabled:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                datasets.utils.enable_progress_bars()


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
    caption_templates: list[str] | None = None,
    label_names: dict[str, str] | None = None,
    template_seed: int = 0,
    split_fraction: float | None = None,
    split_part: str = "train",
    split_seed: int = 0,
    shots_per_class: int | None = None,
    shots_seed: int = 0,
    report: dict | None = None,
) -> datasets.Dataset:
    """Load one split into the normal form above. `key` is the recipe key, quoted in every error.

    `report`, when given, receives what normalisation drops: ``empty_captions`` (count) and
    ``empty_caption_rows`` (the first 5 source rows with an empty or missing caption); with
    `shots_per_class`, ``shots_short_classes`` ({class: images} for classes with fewer than k).

    datasets' progress bars and info lines are silenced unless the split comes from the Hub.
    """
    from_hub = synthetic is None and is_hub_lookup(path, data_files)
    with quiet_datasets(enabled=not from_hub):
        raw, where = _load_raw(key, path, name, revision, data_files, split, synthetic, image_column)
        return _normalize(
            raw,
            key=key,
            where=where,
            image_column=image_column,
            caption_column=caption_column,
            image_id_column=image_id_column,
            label_column=label_column,
            max_samples=max_samples,
            caption_templates=caption_templates if caption_column is None else None,
            label_names=label_names,
            template_seed=template_seed,
            split_fraction=split_fraction,
            split_part=split_part,
            split_seed=split_seed,
            shots_per_class=shots_per_class,
            shots_seed=shots_seed,
            report=report,
        )


def _load_raw(
    key: str, path, name, revision, data_files, split: str, synthetic: dict | None, image_column: str = "image"
) -> tuple[datasets.Dataset, str]:
    if synthetic is not None:
        raw = datasets.Dataset.from_dict(
            generate_synthetic(**synthetic),  # generate_domain, captions translated when asked
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "caption": datasets.List(datasets.Value("string")),
                    "image_id": datasets.Value("string"),
                    "label": datasets.Value("string"),
                }
            ),
        )
        return raw, f"synthetic {synthetic['domain']} domain"
    from data_tools.formats import (
        PathColumnError,
        resolve_image_paths,
        table_base_dir,
        table_file,
    )

    where = f"{path!r} (split {split!r})"
    builder, files = table_file(path, data_files)  # a bare `data.csv` loads through the csv builder
    try:
        with hub_or_cache(path, data_files):
            raw = datasets.load_dataset(builder, name, data_files=files, split=split, revision=revision)
    except Exception as exc:  # datasets raises many types; the user needs the key and the cause
        raise DataLoadError(
            f"{key}.path: could not load dataset {where}: {type(exc).__name__}: {exc}.{offline_note(path, data_files)}"
        ) from exc
    if image_column in raw.column_names:
        try:
            raw = resolve_image_paths(raw, image_column, table_base_dir(path if builder == path else None, files), key)
        except PathColumnError as exc:
            raise DataLoadError(str(exc)) from None
    return raw, where


def _normalize(
    raw: datasets.Dataset,
    *,
    key: str,
    where: str,
    image_column: str,
    caption_column: str,
    image_id_column: str | None,
    label_column: str | None,
    max_samples: int | None,
    caption_templates: list[str] | None = None,
    label_names: dict[str, str] | None = None,
    template_seed: int = 0,
    split_fraction: float | None = None,
    split_part: str = "train",
    split_seed: int = 0,
    shots_per_class: int | None = None,
    shots_seed: int = 0,
    report: dict | None = None,
) -> datasets.Dataset:
    from data_tools.templates import label_captions, pick_template

    caption_columns = [caption_column] if isinstance(caption_column, str) else list(caption_column or [])
    columns = [
        (f"{key}.image_column", image_column),
        *((f"{key}.caption_column", c) for c in caption_columns),
        (f"{key}.image_id_column", image_id_column),
        (f"{key}.label_column", label_column),
    ]
    missing = [f"{k}: column {v!r} not in {where}" for k, v in columns if v and v not in raw.column_names]
    if missing:
        raise DataLoadError("; ".join(missing) + f". Columns there: {', '.join(raw.column_names)}")

    if max_samples is not None:
        raw = raw.select(range(min(max_samples, len(raw))))
    if isinstance(raw.features[image_column], datasets.Image):
        raw = raw.cast_column(image_column, datasets.Image(decode=False))

    if caption_column is None and not (caption_templates and label_column):
        raise DataLoadError(f"{key}.caption_column is null: a label-only set needs {key}.caption_templates and {key}.label_column")
    keep = [c for c in (image_column, *caption_columns, image_id_column, label_column) if c]
    raw = raw.select_columns(list(dict.fromkeys(keep)))
    # The id a user can look up in the source: the configured column, else the row itself.
    ids = [str(i) for i in raw[image_id_column]] if image_id_column else [str(i) for i in range(len(raw))]
    if split_fraction is not None:  # a seeded split by image: all rows of one image land on one side
        keep_rows = [r for r, i in enumerate(ids) if in_eval_part(i, split_fraction, split_seed) == (split_part == "eval")]
        raw = raw.select(keep_rows)
        ids = [ids[r] for r in keep_rows]
        if not ids:
            raise DataLoadError(f"{key}.split_fraction={split_fraction}: no image falls on the {split_part!r} side of {where}")
    if shots_per_class is not None:  # a seeded k-shot draw by image: all rows of a kept image stay
        if not label_column:
            raise DataLoadError(f"{key}.shots_per_class={shots_per_class} draws images per class: {key} is loaded without a label column")
        keep_rows, short = few_shot_rows(ids, [str(v) for v in raw[label_column]], shots_per_class, shots_seed)
        raw = raw.select(keep_rows)
        ids = [ids[r] for r in keep_rows]
        if short:
            warnings.warn(
                f"{key}.shots_per_class={shots_per_class}: {len(short)} class(es) have fewer images and keep all of them: "
                + ", ".join(f"{label} ({n})" for label, n in short.items()),
                stacklevel=3,  # the caller of load_image_text_dataset
            )
        if report is not None:
            report["shots_short_classes"] = short
    # Factorize ids in order of first appearance: rows of one image share one integer.
    _, first_index, inverse = np.unique(np.asarray(ids), return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first_index))
    image_index = order[inverse].astype(np.int64)

    def explode(batch, indices):
        out = {"image": [], "caption": [], "image_index": [], "source_row": [], "image_id": []}
        if label_column:
            out["label"] = []
        if caption_column is None:
            out["caption_choices"] = []
        for row, i in enumerate(indices):
            if caption_column is None:  # label-only: one caption per image, drawn from the templates
                choices = label_captions(str(batch[label_column][row]), caption_templates, label_names)
                captions = [choices[pick_template(template_seed, 0, int(i), len(choices))]]
                out["caption_choices"].append(choices)
            else:  # each caption column holds a caption or a list of captions; all are captions of this image
                captions = []
                for column in caption_columns:
                    value = batch[column][row]
                    captions += [value] if isinstance(value, str) else list(value or [])
            for caption in captions:
                if not isinstance(caption, str) or not caption.strip():
                    continue
                out["image"].append(batch[image_column][row])
                out["caption"].append(caption)
                out["image_index"].append(int(image_index[i]))
                out["source_row"].append(int(i))
                out["image_id"].append(ids[i])
                if label_column:
                    out["label"].append(str(batch[label_column][row]))
        return out

    features = {
        "image": raw.features[image_column] if isinstance(raw.features[image_column], datasets.Image) else None,
        "caption": datasets.Value("string"),
        "image_index": datasets.Value("int64"),
        "source_row": datasets.Value("int64"),
        "image_id": datasets.Value("string"),
    }
    if label_column:
        features["label"] = datasets.Value("string")
    if caption_column is None:
        features["caption_choices"] = datasets.List(datasets.Value("string"))
    if report is not None and caption_column is not None:

        def has_text(c) -> bool:
            return (isinstance(c, str) and bool(c.strip())) or (isinstance(c, list) and any(isinstance(x, str) and x.strip() for x in c))

        per_column = [raw[c] for c in caption_columns]
        empty = [i for i in range(len(raw)) if not any(has_text(col[i]) for col in per_column)]
        report["empty_captions"], report["empty_caption_rows"] = len(empty), empty[:5]
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


def few_shot_rows(image_ids: list[str], labels: list[str], k: int, seed: int) -> tuple[list[int], dict[str, int]]:
    """The rows of a k-shot draw (in their original order) and {class: images} for classes with fewer than k.

    By image: rows sharing an id are one image, whose class is its first row's label. Classes in sorted
    order, each class's images in order of first appearance, shuffled once by numpy's default_rng(seed);
    the first k are kept. The shuffle never depends on k, so a seed's k-shot set holds its smaller ones.
    """
    first_row: dict[str, int] = {}
    for row, image_id in enumerate(image_ids):
        first_row.setdefault(image_id, row)
    by_class: dict[str, list[str]] = {}
    for image_id, row in first_row.items():
        by_class.setdefault(labels[row], []).append(image_id)
    rng = np.random.default_rng(seed)
    kept: set[str] = set()
    short: dict[str, int] = {}
    for label in sorted(by_class):
        images = by_class[label]
        kept.update(images[i] for i in rng.permutation(len(images))[:k])
        if len(images) < k:
            short[label] = len(images)
    return [row for row, image_id in enumerate(image_ids) if image_id in kept], short


def in_eval_part(image_id: str, fraction: float, seed: int) -> bool:
    """Whether an image belongs to the eval side of a seeded split: a hash of (seed, image id), so the
    answer never depends on row order or on which other images are loaded."""
    digest = hashlib.blake2b(f"{seed}:{image_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction


def decode_image(value, draft_size: int | None = None) -> Image.Image | None:
    """PIL image in RGB, or None when the bytes/path cannot be read (the caller skips and counts it).

    `draft_size`: a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides
    >= draft_size (libjpeg's DCT scaling, far less work than decoding every pixel and resizing them).
    """
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
        if draft_size and image.format == "JPEG":
            image.draft("RGB", (draft_size, draft_size))
        image.load()
        return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None


RETRIEVAL_COLUMNS = ("image", "caption", "image_index", "source_row", "image_id")


@dataclass
class RetrievalSet:
    """An eval split regrouped for retrieval: unique images and all captions, with the caption->image map.

    Holds the (Arrow-backed) pairs dataset and, per unique image, the row of `pairs` that carries it,
    never the image bytes: each process reads and decodes only its own shard when it embeds.
    """

    pairs: datasets.Dataset  # the normal form this set was built from
    image_rows: np.ndarray  # (N_img,) row of `pairs` holding each unique image (its first caption's row)
    image_ids: list[str]  # (N_img,) stable id per image
    source_rows: np.ndarray  # (N_img,) row of the loaded split per image
    labels: list[str] | None  # (N_img,) label per image; None when the set has no label column
    captions: list[str]  # (N_txt,)
    text_to_image: np.ndarray  # (N_txt,) index into the unique images

    @classmethod
    def from_pairs(cls, pairs: datasets.Dataset) -> "RetrievalSet":
        missing = [c for c in RETRIEVAL_COLUMNS if c not in pairs.column_names]
        if missing:
            raise DataLoadError(
                f"a retrieval set needs the normal form's columns {', '.join(RETRIEVAL_COLUMNS)}; missing "
                f"{', '.join(missing)} (load it with load_image_text_dataset)"
            )
        index = np.asarray(pairs["image_index"], dtype=np.int64)  # (N_txt,)
        _, first_row = np.unique(index, return_index=True)
        rows = np.sort(first_row)  # images in order of first appearance
        remap = np.full(int(index.max()) + 1, -1, dtype=np.int64)
        remap[index[rows]] = np.arange(len(rows))
        # Columnar reads of the small columns only; the image column is never read here.
        meta = pairs.select_columns([c for c in ("source_row", "image_id", "label") if c in pairs.column_names])
        meta = meta.select(rows.tolist())
        return cls(
            pairs=pairs,
            image_rows=rows.astype(np.int64),
            image_ids=[str(i) for i in meta["image_id"]],
            source_rows=np.asarray(meta["source_row"], dtype=np.int64),
            labels=[str(v) for v in meta["label"]] if "label" in meta.column_names else None,
            captions=list(pairs["caption"]),
            text_to_image=remap[index],
        )

    @property
    def num_images(self) -> int:
        return len(self.image_rows)

    @property
    def images(self) -> "ImageColumn":
        """Undecoded image values, one per unique image, read from `pairs` on access."""
        return ImageColumn(self.pairs, self.image_rows)


class ImageColumn:
    """A read-on-access view of the image values at given rows of a dataset: len, [i], iteration."""

    def __init__(self, pairs: datasets.Dataset, rows: np.ndarray):
        self.pairs, self.rows = pairs, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.pairs[int(self.rows[i])]["image"]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]
