"""A data report before training: what is in each configured dataset, and what is wrong with it.

Per dataset (the normal form of data_tools/loading.py): rows, unique images, captions per image,
caption length in tokens (and how many exceed the token limit), per-class counts with the head /
medium / tail split, unreadable / zero-byte / truncated / missing images and empty captions (counted,
the first 5 named with their source row), exact duplicate images (content hash). Across datasets:
images of an eval set that also occur in the training data (leakage, by content hash).

Fast by default: every image is hashed and its header checked (PIL opens it lazily; the file's end
marker is checked for PNG and JPEG), never decoded. `decode=True` also decodes every image, which
finds the damage a header cannot show, at the cost of a full pass of decoding.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections import Counter
from collections.abc import Iterable

import datasets
import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from data_tools.sampling import class_counts, frequency_groups

FIRST_N = 5  # problems named per kind
_END_MARKERS = {"PNG": b"IEND\xaeB`\x82", "JPEG": b"\xff\xd9"}


def _image_bytes(value) -> tuple[bytes | None, str | None]:
    """(content, problem) of an undecoded image value: problem is "missing" or "zero_byte"."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            data = value["bytes"]
        elif value.get("path"):
            return _file_bytes(value["path"])
        else:
            return None, "missing"
    elif isinstance(value, (str, os.PathLike)):
        return _file_bytes(value)
    elif isinstance(value, (bytes, bytearray)):
        data = bytes(value)
    elif isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        return None, "missing"
    return (data, None) if data else (None, "zero_byte")


def _file_bytes(path) -> tuple[bytes | None, str | None]:
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError:
        return None, "missing"
    return (data, None) if data else (None, "zero_byte")


def check_image(data: bytes, decode: bool) -> str | None:
    """None when the image looks fine, else "unreadable" (PIL cannot identify it) or "truncated"."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            marker = _END_MARKERS.get(image.format or "")
            if marker is not None and not data.rstrip(b"\x00").endswith(marker):
                return "truncated"
            if decode:
                image.load()
    except (UnidentifiedImageError, SyntaxError, ValueError):
        return "unreadable"
    except OSError:  # PIL's "image file is truncated" on load
        return "truncated"
    return None


def _percentiles(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    arr = np.asarray(values)
    return {
        "min": int(arr.min()),
        "p50": float(np.percentile(arr, 50)),
        "p90": float(np.percentile(arr, 90)),
        "p99": float(np.percentile(arr, 99)),
        "max": int(arr.max()),
        "mean": float(arr.mean()),
    }


def inspect_pairs(
    pairs: datasets.Dataset,
    *,
    tokenizer,
    max_text_length: int,
    decode: bool = False,
    empty_captions: dict | None = None,
    desc: str = "images",
) -> tuple[dict, dict[str, list[int]]]:
    """(report of one dataset in the normal form, {content hash: [image_index, ...]}).

    `empty_captions` is what `load_image_text_dataset(report=...)` collected (normalisation drops
    rows without a caption, so they can only be counted there).
    """
    image_index = np.asarray(pairs["image_index"])
    _, first_rows = np.unique(image_index, return_index=True)
    first_rows = np.sort(first_rows)
    per_image = Counter(image_index.tolist())

    captions = pairs["caption"]
    lengths = []
    for start in range(0, len(captions), 4096):
        lengths += [len(ids) for ids in tokenizer(captions[start : start + 4096], truncation=False, verbose=False)["input_ids"]]
    over = [i for i, n in enumerate(lengths) if n > max_text_length]

    meta = pairs.select_columns([c for c in ("source_row", "label") if c in pairs.column_names]).select(first_rows.tolist())
    source_rows = meta["source_row"]
    labels = [str(v) for v in meta["label"]] if "label" in meta.column_names else None

    problems: dict[str, list[int]] = {"missing": [], "zero_byte": [], "unreadable": [], "truncated": []}
    hashes: dict[str, list[int]] = {}
    images = pairs.select_columns(["image"]).select(first_rows.tolist())
    for k in tqdm(range(0, len(images), 256), desc=desc, leave=False):
        for offset, value in enumerate(images[k : k + 256]["image"]):
            i = k + offset
            data, problem = _image_bytes(value)
            if problem is None:
                problem = check_image(data, decode)
                hashes.setdefault(hashlib.blake2b(data, digest_size=16).hexdigest(), []).append(int(i))
            if problem is not None:
                problems[problem].append(int(source_rows[i]))

    duplicates = {h: ids for h, ids in hashes.items() if len(ids) > 1}
    report = {
        "rows": len(pairs),
        "unique_images": len(first_rows),
        "captions_per_image": _percentiles(list(per_image.values())),
        "caption_tokens": _percentiles(lengths),
        "max_text_length": max_text_length,
        "captions_over_limit": len(over),
        "captions_over_limit_first": [{"row": int(pairs[int(i)]["source_row"]), "caption": captions[i]} for i in over[:FIRST_N]],
        "empty_captions": (empty_captions or {}).get("empty_captions", 0),
        "empty_captions_first_rows": (empty_captions or {}).get("empty_caption_rows", []),
        "images": {kind: {"count": len(rows), "first_rows": rows[:FIRST_N]} for kind, rows in problems.items()},
        "duplicate_images": {
            "groups": len(duplicates),
            "images_in_groups": sum(len(v) for v in duplicates.values()),
            "first_groups_rows": [[int(source_rows[i]) for i in ids] for ids in list(duplicates.values())[:FIRST_N]],
        },
        "decoded": decode,
    }
    if labels is not None:
        counts = dict(sorted(class_counts(labels).items(), key=lambda kv: (-kv[1], kv[0])))
        groups = frequency_groups(counts)
        report["classes"] = {
            "count": len(counts),
            "images_per_class": counts,
            "groups": groups,
            "thresholds": group_thresholds(counts, groups),
        }
    return report, hashes


def group_thresholds(counts: dict[str, int], groups: dict[str, str]) -> str:
    """The head / medium / tail split in words, with the counts where it falls."""
    parts = []
    for group in ("head", "medium", "tail"):
        members = [counts[c] for c, g in groups.items() if g == group]
        if members:
            parts.append(f"{group}: {len(members)} classes with {min(members)}-{max(members)} images")
    return "by frequency rank: the most frequent third of the classes is head, the least frequent third tail; " + "; ".join(parts)


def leakage(train_hashes: Iterable[dict[str, list[int]]], eval_hashes: dict[str, list[int]]) -> int:
    """Images of an eval set whose exact content also occurs in the training data."""
    seen = set()
    for hashes in train_hashes:
        seen.update(hashes)
    return sum(len(ids) for h, ids in eval_hashes.items() if h in seen)


def format_report(key: str, report: dict) -> str:
    """A few lines per dataset for the terminal."""
    cpi, tok = report["captions_per_image"], report["caption_tokens"]
    lines = [
        f"{key}: {report['rows']} rows, {report['unique_images']} unique images, "
        f"captions per image {cpi.get('min')}-{cpi.get('max')} (mean {cpi.get('mean', 0):.2f})",
        f"  caption tokens: p50 {tok.get('p50', 0):.0f}, p90 {tok.get('p90', 0):.0f}, max {tok.get('max')}; "
        f"{report['captions_over_limit']} over the limit of {report['max_text_length']}",
        f"  empty captions: {report['empty_captions']}"
        + (f" (rows {report['empty_captions_first_rows']})" if report["empty_captions"] else ""),
    ]
    bad = [f"{kind} {v['count']}" + (f" (rows {v['first_rows']})" if v["count"] else "") for kind, v in report["images"].items()]
    mode = "decoded" if report["decoded"] else "header-checked, not decoded (--decode to decode)"
    lines.append(f"  images {mode}: " + ", ".join(bad))
    dup = report["duplicate_images"]
    lines.append(
        f"  exact duplicate images: {dup['groups']} groups, {dup['images_in_groups']} images"
        + (f" (rows {dup['first_groups_rows']})" if dup["groups"] else "")
    )
    if "leaked_from_train" in report:
        lines.append(f"  leakage: {report['leaked_from_train']} images also in the training data (exact content)")
    if "classes" in report:
        c = report["classes"]
        top = ", ".join(f"{k} {v}" for k, v in c["images_per_class"].items())
        lines.append(f"  classes: {c['count']}: {top}")
        lines.append(f"  {c['thresholds']}")
    return "\n".join(lines)


def save_longtail_png(reports: dict[str, dict], fh) -> None:
    """Images per class, most frequent first, coloured head / medium / tail; one panel per labelled dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = {k: r for k, r in reports.items() if "classes" in r}
    fig, axes = plt.subplots(1, max(len(labelled), 1), figsize=(5.5 * max(len(labelled), 1), 3.8), squeeze=False)
    colors = {"head": "#1f77b4", "medium": "#ff7f0e", "tail": "#d62728"}
    try:
        if not labelled:
            axes[0][0].text(0.5, 0.5, "no dataset has a label_column", ha="center", va="center")
        for ax, (key, r) in zip(axes[0], labelled.items()):
            counts, groups = r["classes"]["images_per_class"], r["classes"]["groups"]
            ax.bar(range(len(counts)), list(counts.values()), color=[colors[groups[c]] for c in counts])
            ax.set_xticks(range(len(counts)), list(counts), rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{key}: images per class")
            for group, color in colors.items():
                ax.bar([], [], color=color, label=group)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


def inspect_datasets(
    datasets_to_load: dict[str, dict], *, tokenizer, max_text_length: int, out_dir, decode: bool = False
) -> dict[str, dict]:
    """Load each dataset ({recipe key: load_image_text_dataset arguments}), report on it, check eval sets
    against the training data (keys starting with data.train / data.replay) for leakage, and write
    `data_report.json` and `longtail.png` into `out_dir`. Returns the reports by key."""
    import json
    from pathlib import Path

    from data_tools.loading import load_image_text_dataset
    from finetune.io import atomic_open, atomic_write_text

    reports, hashes = {}, {}
    for key, arguments in datasets_to_load.items():
        dropped: dict = {}
        pairs = load_image_text_dataset(key=key, **arguments, report=dropped)
        reports[key], hashes[key] = inspect_pairs(
            pairs, tokenizer=tokenizer, max_text_length=max_text_length, decode=decode, empty_captions=dropped, desc=key
        )
    train_keys = [k for k in reports if k.startswith(("data.train", "data.replay"))]
    for key in reports:
        if key.startswith("data.eval"):
            reports[key]["leaked_from_train"] = leakage([hashes[k] for k in train_keys], hashes[key])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "data_report.json", json.dumps(reports, indent=2) + "\n")
    with atomic_open(out / "longtail.png") as fh:
        save_longtail_png(reports, fh)
    return reports
