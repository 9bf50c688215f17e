"""One training set from the target data plus replay sets (e.g. 10-30% source-domain data against
forgetting), and the per-pair class ids the label-aware loss and samplers use.

`concatenate_training_sets` puts the primary set first and each replay set after it, renumbering
`image_index` so images of different sets never share one (the loss masks pairs of one image), and
returns each part's row range for `data_tools.sampling.MixtureSampler`, which draws each replay set's
fraction of every epoch. Class-aware options (sampler, class weights, same-label masking) are about
the primary set's classes: replay rows get `label_id` -1, "unlabelled" (weight 1, never masked).
"""

from __future__ import annotations

import datasets

OPTIONAL_COLUMNS = {"label": datasets.Value("string"), "caption_choices": datasets.List(datasets.Value("string"))}


def class_vocabulary(labels: list[str]) -> list[str]:
    """Sorted distinct labels: class id i is vocabulary[i]."""
    return sorted(set(labels))


def with_label_ids(pairs: datasets.Dataset, vocabulary: list[str] | None) -> datasets.Dataset:
    """Add `label_id` (int64): the row's class in `vocabulary`, -1 when unlabelled or not in it."""
    index = {c: i for i, c in enumerate(vocabulary or [])}
    labels = pairs["label"] if "label" in pairs.column_names else [None] * len(pairs)
    ids = [index.get(label, -1) if label is not None else -1 for label in labels]
    return pairs.add_column("label_id", ids, feature=datasets.Value("int64"))


def concatenate_training_sets(
    primary: datasets.Dataset, extras: list[datasets.Dataset], vocabulary: list[str] | None
) -> tuple[datasets.Dataset, list[tuple[int, int]]]:
    """(one dataset: primary rows, then each extra's; [(offset, size)] of each extra part)."""
    parts = [with_label_ids(primary, vocabulary)] + [with_label_ids(extra, None) for extra in extras]
    columns = set().union(*(p.column_names for p in parts))
    ranges, offset, image_offset, aligned = [], 0, 0, []
    for k, part in enumerate(parts):
        for name, feature in OPTIONAL_COLUMNS.items():
            if name in columns and name not in part.column_names:
                fill = "" if name == "label" else []
                part = part.add_column(name, [fill] * len(part), feature=feature)
        if image_offset:  # a plain column swap: no map, no progress bar for a bookkeeping step
            shifted = [i + image_offset for i in part["image_index"]]
            part = part.remove_columns("image_index").add_column("image_index", shifted, feature=datasets.Value("int64"))
        if k:
            ranges.append((offset, len(part)))
        offset += len(part)
        image_offset = max(part["image_index"]) + 1  # after the shift: the next set starts above this one
        aligned.append(part.select_columns(sorted(columns | {"label_id"})))
    from data_tools.loading import quiet_datasets

    features = aligned[0].features
    try:
        with quiet_datasets():
            aligned = [aligned[0]] + [p if p.features == features else p.cast(features) for p in aligned[1:]]
    except (ValueError, TypeError) as exc:
        raise ValueError(
            f"data.replay: a replay set's columns do not match data.train's ({exc}); its image column must hold the "
            "same kind of value (an image, or a path)"
        ) from None
    return datasets.concatenate_datasets(aligned), ranges
