"""Local tables whose image column holds file paths (CSV / JSONL / parquet), the way users arrive with a
folder of images and a spreadsheet.

Paths are read relative to the table file (absolute paths are kept); URLs are refused with a clear
message, since training never fetches from the network. A path column where none of the first rows
points at a file is a configuration mistake and stops with the recipe key and the row; a single
missing file later on is skipped and counted like any unreadable image.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets

TABLE_BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
_PROBE_ROWS = 20  # rows checked for a path column that points nowhere


class PathColumnError(ValueError):
    """The image column's paths cannot be used (URLs, or none of them exists)."""


def table_file(path: str | None, data_files) -> tuple[str | None, object]:
    """(builder, data_files) for a bare table file given as `path` (`data.csv`); else (path, data_files)."""
    if path and os.path.isfile(path) and Path(path).suffix.lower() in TABLE_BUILDERS:
        return TABLE_BUILDERS[Path(path).suffix.lower()], path
    return path, data_files


def table_base_dir(path: str | None, data_files) -> Path | None:
    """The folder relative image paths are read from: the table file's folder (the first file's)."""
    files = []
    if isinstance(data_files, (str, os.PathLike)):
        files = [data_files]
    elif isinstance(data_files, dict):
        first = next(iter(data_files.values()), [])
        files = [first] if isinstance(first, (str, os.PathLike)) else list(first)
    elif data_files:
        files = list(data_files)
    if files:
        return Path(files[0]).parent
    if path and os.path.isdir(path):
        return Path(path)
    return None


def resolve_image_paths(raw: datasets.Dataset, image_column: str, base_dir: Path | None, key: str) -> datasets.Dataset:
    """Image column of strings -> absolute paths (relative ones joined to `base_dir`)."""
    feature = raw.features[image_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        return raw
    values = raw[image_column]
    for row, value in enumerate(values):
        if isinstance(value, str) and value.split("://", 1)[0].lower() in ("http", "https", "s3", "gs", "hf"):
            raise PathColumnError(
                f"{key}.image_column: row {row} holds a URL ({value!r}); images are not downloaded during training. "
                "Download them once and put local paths (relative to the table file, or absolute) in the column"
            )
    base = base_dir or Path(".")
    resolved = [str(v) if v is None or os.path.isabs(str(v)) else str(base / str(v)) for v in values]
    probe = [(row, p) for row, p in enumerate(resolved[:_PROBE_ROWS]) if p is not None]
    if probe and not any(os.path.isfile(p) for _, p in probe):
        row, first = probe[0]
        raise PathColumnError(
            f"{key}.image_column: none of the first {len(probe)} paths exists (row {row}: {values[row]!r} -> {first}); "
            f"relative paths are read from the table's folder ({base})"
        )
    return raw.remove_columns(image_column).add_column(image_column, resolved)
