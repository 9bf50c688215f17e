"""Parallel text for distillation (stage 1 of a text-tower swap): English captions and their translations.

`load_parallel_text` reads a parallel dataset (a hub id, a local table) or the demo's synthetic parallel
captions (`data_tools.synthetic.multilingual`) into (student input, English caption) pairs.
"""

from __future__ import annotations

import datasets

from data_tools.hub import hub_or_cache, offline_note
from data_tools.synthetic.multilingual import parallel_text_rows
from finetune.errors import DataLoadError


def load_parallel_text(
    key: str,
    *,
    path: str | None,
    name: str | None,
    revision: str | None,
    data_files,
    split: str,
    english_column: str,
    text_columns: list[str],
    include_english: bool,
    max_samples: int | None,
    synthetic: dict | None,
) -> tuple[list[str], list[str]]:
    """(student inputs, their English captions): one pair per translation (and per English caption when
    `include_english`). Rows with an empty or missing English caption are dropped; so are empty translations.

    `synthetic` ({domain, num_samples, seed, languages}) generates the columns instead, named by language.
    Raises `DataLoadError` naming `key` and the available columns when a column is missing.
    """
    if synthetic is not None:
        columns = parallel_text_rows(synthetic["num_samples"], synthetic["seed"], synthetic["languages"], synthetic["domain"])
        where, available = "synthetic parallel captions", list(columns)
    else:
        where = f"{path!r} (split {split!r})"
        try:
            with hub_or_cache(path, data_files):
                table = datasets.load_dataset(path, name, data_files=data_files, split=split, revision=revision)
        except Exception as exc:  # datasets raises many types; the user needs the key and the cause
            raise DataLoadError(
                f"{key}.path: could not load dataset {where}: {type(exc).__name__}: {exc}.{offline_note(path, data_files)}"
            ) from exc
        available = list(table.column_names)
        columns = None
    missing = [(k, c) for k, c in [("english_column", english_column), *(("text_columns", c) for c in text_columns)] if c not in available]
    if missing:
        raise DataLoadError("; ".join(f"{key}.{k}: no column {c!r} in {where}" for k, c in missing) + f"; columns: {', '.join(available)}")
    if columns is None:
        rows = table if max_samples is None else table.select(range(min(max_samples, len(table))))
        columns = {c: rows[c] for c in dict.fromkeys([english_column, *text_columns])}
    elif max_samples is not None:
        columns = {c: v[:max_samples] for c, v in columns.items()}

    inputs, english = [], []
    sources = ([english_column] if include_english else []) + [c for c in text_columns if c != english_column]
    for row, target in enumerate(columns[english_column]):
        if not isinstance(target, str) or not target.strip():
            continue
        for column in sources:
            text = columns[column][row]
            if isinstance(text, str) and text.strip():
                inputs.append(text)
                english.append(target)
    if len(inputs) == 0:
        raise DataLoadError(f"{key}: no usable parallel captions in {where} (every English caption or translation is empty)")
    return inputs, english
