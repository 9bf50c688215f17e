"""Retrieval reports: named result rows in, markdown table, JSON and bar chart out.

A result set maps model names to metrics: ``{"zero_shot": ..., "adapted": ..., "alpha=0.5": ...,
"int8": ...}``, each ``{set: {direction: {metric: value}}}`` as `finetune.evaluation.metrics.retrieval_metrics`
returns it per eval set. One of the names is the baseline (``zero_shot`` unless told otherwise):
every other model gets a delta column against it. The numbers themselves come from
finetune/evaluation/metrics.py; nothing here computes a metric.
"""

from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from finetune.io import atomic_open, atomic_write_text
from finetune.runfolder import RESULTS_JSON

__all__ = ["describe_duplicate_captions", "format_language_table", "format_results_table", "format_set_notes", "write_results"]

# Orders used for tables and plots: target first (what we adapt to), then source (what we must not
# forget); text->image before image->text. Unknown names follow, sorted, so nothing is dropped.
_SET_ORDER = ("target", "source")
_DIRECTION_ORDER = ("t2i", "i2t", "classification", "class_retrieval", "long_tail")
_CLASS_LEVEL = ("classification", "class_retrieval", "long_tail")
_DIRECTION_LABELS = {"t2i": "text->image", "i2t": "image->text"}
# Nested per-class detail in results.json: not a table row, drawn in results_per_class.png instead.
PER_CLASS = "per_class"
_RECALL_RE = re.compile(r"^R@(\d+)$")
_LABEL_INSIDE_ABOVE = 90.0  # bar height (%) above which its value label is drawn inside the bar
_BASELINE_COLOR = "#9e9e9e"
_MODEL_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
_SHAPE = "{model: {set: {direction: {metric: value}}}}"
# Classification baselines on the frozen base model's image features (finetune/evaluation/baselines.py):
# shown beside zero-shot and adapted, last, with no delta column of their own.
BASELINE_ROWS = ("linear_probe", "knn")


def format_results_table(results: Mapping[str, Any], baseline: str = "zero_shot", lead_with_classes: Iterable[str] = ()) -> str:
    """Markdown table of every model's retrieval metrics, one row per (set, direction, metric).

    Columns: ``set | direction | metric``, one column per model (the baseline first, then the
    others in insertion order; ``_`` in a name shows as ``-``), then, when the baseline is present,
    one delta column per other model (``delta`` when there is one, ``delta <model>`` otherwise).
    A delta is model - baseline; for ranks lower is better, so a negative delta there is an
    improvement. Missing values show as "-". The columns are padded so the same string reads well
    on a terminal and renders as a table in results.md.

    Args:
        results: ``{model: {set: {direction: {metric: value}}}}``; a model may lack any set.
        baseline: the model the deltas are taken against.
        lead_with_classes: sets whose class-level rows (classification, class_retrieval,
            long_tail) come before instance recall, because instance recall misleads there.

    Raises:
        ValueError: when results is not that nesting of mappings or a value is not a number.
    """
    _check_results(results)
    lead_with_classes = set(lead_with_classes)
    names = _model_names(results, baseline)
    others = [n for n in names if n != baseline and n not in BASELINE_ROWS] if baseline in results else []
    if len(others) == 1:
        delta_headers = ["delta"]
    else:
        delta_headers = [f"delta {_label(n)}" for n in others]
    header = ["set", "direction", "metric", *(_label(n) for n in names), *delta_headers]
    right_aligned = [False] * 3 + [True] * (len(header) - 3)

    body = []
    for eval_set, direction, metric, values in _table_rows(results, names, lead_with_classes):
        by_name = dict(zip(names, values))
        deltas = []
        for name in others:
            base, value = by_name[baseline], by_name[name]
            deltas.append(None if base is None or value is None else float(value) - float(base))
        body.append([eval_set, direction, metric, *(_fmt(v) for v in values), *(_fmt(d, signed=True) for d in deltas)])

    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    widths = [max(w, 3) for w in widths]  # markdown needs at least '---' in the rule row

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(w) if right else c.ljust(w) for c, w, right in zip(cells, widths, right_aligned)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if right else (":" + "-" * (w + 1)) for w, right in zip(widths, right_aligned)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def format_language_table(
    results: Mapping[str, Any],
    languages: Sequence[str],
    reference: str | None = None,
    reference_language: str = "en",
) -> str:
    """Per-language retrieval, one row per (language, model): t2i and i2t R@K side by side.

    ``languages`` are eval-set names (ISO codes). The last model in ``results`` is the final one: a
    ``gap`` column gives its text->image R@1 minus the reference language's, and ``reference`` (a model
    scored on the reference language only, e.g. the original CLIP text tower) appears as its own rows.
    """
    _check_results(results)
    names = list(results)
    final = names[-1]
    ks = sorted(
        {m for lang in languages for n in names for m in _metrics_of(results, n, lang, "t2i") if _RECALL_RE.match(m)},
        key=_metric_sort_key,
    )
    header = ["lang", "model", *(f"t2i {k}" for k in ks), *(f"i2t {k}" for k in ks), f"t2i R@1 vs {reference_language}"]
    base_r1 = _lookup(results, final, reference_language, "t2i", "R@1")
    body = []
    for lang in languages:
        for name in names:
            if lang not in results[name]:
                continue
            row = [lang, _label(name)]
            row += [_fmt(_lookup(results, name, lang, d, k)) for d in ("t2i", "i2t") for k in ks]
            r1 = _lookup(results, name, lang, "t2i", "R@1")
            gap = None if name != final or base_r1 is None or r1 is None or name == reference else float(r1) - float(base_r1)
            if name == reference and base_r1 is not None and r1 is not None:
                gap = float(base_r1) - float(r1)  # the final model's English minus the original tower's: retention
            row.append(_fmt(gap, signed=True) if gap is not None else "")
            body.append(row)
    widths = [max(3, max(len(r[i]) for r in [header, *body])) for i in range(len(header))]
    lines = [
        "| " + " | ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |" for r in [header, *body]
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    note = (
        f"\n\nLast column: for {_label(final)}, its text->image R@1 minus its own on {reference_language}; on the "
        f"{_label(reference)} row, {_label(final)}'s {reference_language} R@1 minus the original text tower's (retention)."
        if reference in results
        else f"\n\nLast column: {_label(final)}'s text->image R@1 minus its own on {reference_language}."
    )
    return "\n".join(lines) + note


def _metrics_of(results: Mapping[str, Any], model: str, eval_set: str, direction: str) -> list[str]:
    return list(((results.get(model) or {}).get(eval_set) or {}).get(direction) or {})


def describe_duplicate_captions(stats: Mapping[str, Any]) -> str:
    """One sentence from `finetune.evaluation.metrics.duplicate_caption_texts`, for `set_notes`."""
    n, dup = stats["captions"], stats["duplicate_captions"]
    if dup == 0:
        return f"all {n} captions have distinct texts."
    return (
        f"{dup} of {n} captions share their exact text with another caption "
        f"({stats['duplicated_texts']} distinct texts, most often {stats['example']!r}); "
        "identical texts embed identically, so such captions of different images tie exactly "
        "and R@1 cannot reach 100."
    )


def format_set_notes(set_notes: Mapping[str, str]) -> str:
    """Markdown list ``- **set**: note``, in the table's set order."""
    if not isinstance(set_notes, Mapping):
        raise ValueError(f"set_notes must be a mapping {{set: text}}, got {type(set_notes).__name__}")
    for name, note in set_notes.items():
        if not isinstance(note, str):
            raise ValueError(f"set_notes[{name!r}] must be a str, got {type(note).__name__}")
    return "\n".join(f"- **{name}**: {set_notes[name]}" for name in _ordered(set_notes, _SET_ORDER))


def write_results(
    results: Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    baseline: str = "zero_shot",
    set_notes: Mapping[str, str] | None = None,
    lead_with_classes: Iterable[str] = (),
) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir`` (created if missing).

    Each file is written atomically so an interrupted run or a concurrent reader never sees a
    truncated report. The JSON holds `results` as given, with sorted keys so diffs between runs
    stay small.

    Args:
        results: ``{model: {set: {direction: {metric: value}}}}`` (see `format_results_table`).
        out_dir: folder for the three files.
        baseline: the model the deltas are taken against.
        set_notes: optional ``{set: text}`` printed under the table in results.md, e.g. from
            `describe_duplicate_captions`.

    Returns:
        ``{"json": Path, "md": Path, "png": Path}`` of the written files.
    """
    _check_results(results)
    if set_notes is not None:
        format_set_notes(set_notes)  # validate before anything is written
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / RESULTS_JSON, "md": out / "results.md", "png": out / "results.png"}

    lead_with_classes = set(lead_with_classes)
    atomic_write_text(paths["json"], json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n")
    markdown = _results_markdown(results, baseline, set_notes, lead_with_classes)
    per_class_sets = _ordered({s for sets in results.values() for s, d in sets.items() if PER_CLASS in d}, _SET_ORDER)
    if per_class_sets:
        paths["per_class_png"] = out / "results_per_class.png"
        markdown += "\n" + format_per_class_tables(results, baseline)
        with atomic_open(paths["per_class_png"]) as fh:
            _save_per_class_png(results, baseline, per_class_sets, fh)
    atomic_write_text(paths["md"], markdown)
    with atomic_open(paths["png"]) as fh:
        _save_results_png(results, baseline, fh)
    return paths


def _per_class_rows(results: Mapping[str, Any], eval_set: str, names: Sequence[str]) -> list[tuple[str, dict, list]]:
    """(class, its info, [per-model info]) sorted by count, most frequent first."""
    info: dict[str, dict] = {}
    for name in names:  # count and group come from the models that have them (baselines report accuracy only)
        for c, entry in results[name].get(eval_set, {}).get(PER_CLASS, {}).items():
            if "count" in entry:
                info.setdefault(c, entry)
    ordered = sorted(info, key=lambda c: (-info[c]["count"], c))
    return [(c, info[c], [results[n].get(eval_set, {}).get(PER_CLASS, {}).get(c, {}) for n in names]) for c in ordered]


def format_per_class_tables(results: Mapping[str, Any], baseline: str = "zero_shot") -> str:
    """Markdown: per eval set with labels, one row per class (most frequent first) with its frequency
    group and each model's text->image R@1 and classification accuracy."""
    names = _model_names(results, baseline)
    sets = _ordered({s for sets in results.values() for s, d in sets.items() if PER_CLASS in d}, _SET_ORDER)
    parts = []
    for eval_set in sets:
        header = ["class", "count", "group", *(f"t2i R@1 {_label(n)}" for n in names), *(f"acc {_label(n)}" for n in names)]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for cls, meta, per_model in _per_class_rows(results, eval_set, names):
            cells = [cls, str(meta["count"]), meta["group"]]
            cells += [_fmt(m.get("t2i_R@1")) for m in per_model] + [_fmt(m.get("accuracy")) for m in per_model]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append(
            f"## Per class: {eval_set}\n\nClasses sorted by frequency (count: training pairs of the class when the "
            "run has a labelled training set, else this set's images); head = the most frequent third of the classes, "
            "tail = the least frequent third, medium = the rest.\n\n" + "\n".join(lines) + "\n"
        )
    return "\n".join(parts)


def _save_per_class_png(results: Mapping[str, Any], baseline: str, sets: Sequence[str], fh: IO[bytes]) -> None:
    """Per labelled set: t2i R@1 and accuracy per class, one bar per model, classes by frequency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _model_names(results, baseline)
    fig, axes = plt.subplots(len(sets), 2, figsize=(11, 3.6 * len(sets)), squeeze=False)
    try:
        colors = {n: (_BASELINE_COLOR if n == baseline else _MODEL_COLORS[i % len(_MODEL_COLORS)]) for i, n in enumerate(names)}
        width = 0.8 / max(len(names), 1)
        for row, eval_set in enumerate(sets):
            rows = _per_class_rows(results, eval_set, names)
            x = np.arange(len(rows))
            for col, metric in enumerate(("t2i_R@1", "accuracy")):
                ax = axes[row][col]
                for i, name in enumerate(names):
                    if all(per[i].get(metric) is None for _, _, per in rows):
                        continue  # a baseline without this metric (linear probe and k-NN have no t2i R@1)
                    heights = [float(m.get(metric) or 0.0) for _, _, per in rows for m in [per[i]]]
                    ax.bar(x + (i - (len(names) - 1) / 2) * width, heights, width, label=_label(name), color=colors[name])
                ax.set_xticks(x, [f"{c}\n{meta['count']} ({meta['group'][0]})" for c, meta, _ in rows], fontsize=7)
                ax.set_ylim(0, 100)
                ax.set_title(f"{eval_set}: {'text->image R@1' if metric == 't2i_R@1' else 'classification accuracy'} per class")
                ax.grid(axis="y", alpha=0.3)
                ax.set_axisbelow(True)
        axes[0][0].legend(fontsize=8)
        fig.suptitle("Per class, most frequent first (h/m/t = head/medium/tail)")
        fig.tight_layout()
        fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


# --------------------------------------------------------------------------------------------------
# Internals
# --------------------------------------------------------------------------------------------------


def _check_results(results: Any) -> None:
    """Reject anything but {model: {set: {direction: {metric: number}}}}, naming the bad path."""
    _check_level(results, "results", "model")
    for model, sets in results.items():
        _check_level(sets, f"results[{model!r}]", "set")
        for eval_set, directions in sets.items():
            _check_level(directions, f"results[{model!r}][{eval_set!r}]", "direction")
            for direction, metrics in directions.items():
                if direction == PER_CLASS:
                    continue
                where = f"results[{model!r}][{eval_set!r}][{direction!r}]"
                _check_level(metrics, where, "metric")
                for metric, value in metrics.items():
                    if not _is_number(value):
                        raise ValueError(f"{where}[{metric!r}] must be a number, got {type(value).__name__} {value!r}")


def _check_level(node: Any, where: str, child: str) -> None:
    if not isinstance(node, Mapping):
        raise ValueError(f"{where} must be a mapping keyed by {child} name in {_SHAPE}, got {type(node).__name__}")
    for key in node:
        if not isinstance(key, str):
            raise ValueError(f"{where} keys must be {child} names (str), got {key!r}")


def _is_number(value: Any) -> bool:
    """Real numbers (Python, numpy) and one-element tensors; None marks a missing value."""
    if value is None:
        return True
    if isinstance(value, bool):
        return False
    if isinstance(value, torch.Tensor):
        return value.numel() == 1 and not value.is_complex()
    return isinstance(value, (numbers.Real, np.floating, np.integer))


def _model_names(results: Mapping[str, Any], baseline: str) -> list[str]:
    """The baseline first (the anchor every delta refers to), then the others in insertion order, then the
    classification baselines (linear probe, k-NN)."""
    others = [n for n in results if n != baseline and n not in BASELINE_ROWS]
    return ([baseline] if baseline in results else []) + others + [n for n in BASELINE_ROWS if n in results and n != baseline]


def _label(name: str) -> str:
    return name.replace("_", "-")


def _ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """Preferred names first in their given order, then the rest sorted, so output is stable."""
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def _metric_sort_key(name: str) -> tuple[int, str, float, str]:
    """R@K by increasing K, then mean_rank, median_rank, then anything else by name with any @K by K
    (t2i_P@5 before t2i_P@10)."""
    m = _RECALL_RE.match(name)
    if m:
        return (0, "", float(m.group(1)), name)
    fixed = {"mean_rank": 1, "median_rank": 2}
    if name in fixed:
        return (fixed[name], "", 0.0, name)
    at = re.match(r"^(.*)@(\d+)$", name)
    return (3, at.group(1), float(at.group(2)), name) if at else (3, name, 0.0, name)


def _lookup(results: Mapping[str, Any], model: str, eval_set: str, direction: str, metric: str):
    """Value at results[model][eval_set][direction][metric], or None when any level is missing."""
    node: Any = results
    for key in (model, eval_set, direction, metric):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _table_rows(
    results: Mapping[str, Any], names: Sequence[str], lead_with_classes: set[str] = frozenset()
) -> list[tuple[str, str, str, list[Any]]]:
    """(set, direction, metric, [value per model]) for every metric any model has."""
    sets = _ordered((s for n in names for s in results[n]), _SET_ORDER)
    rows = []
    for eval_set in sets:
        order = (*_CLASS_LEVEL, *_DIRECTION_ORDER) if eval_set in lead_with_classes else _DIRECTION_ORDER
        directions = _ordered((d for n in names for d in results[n].get(eval_set, {}) if d != PER_CLASS), order)
        for direction in directions:
            metrics = {m for n in names for m in results[n].get(eval_set, {}).get(direction, {})}
            for metric in sorted(metrics, key=_metric_sort_key):
                values = [_lookup(results, n, eval_set, direction, metric) for n in names]
                rows.append((eval_set, direction, metric, values))
    return rows


def _fmt(value: Any, signed: bool = False) -> str:
    """Two decimals (with explicit sign for deltas); missing values become '-'."""
    if value is None:
        return "-"
    value = float(value)
    if signed and round(value, 2) == 0:
        return "+0.00"  # avoid a misleading "-0.00" for a tiny negative difference
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def _json_default(obj: Any) -> Any:
    """Serialise numpy/torch scalars and small arrays that callers may leave in results."""
    if isinstance(obj, (np.generic, torch.Tensor)) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _results_markdown(
    results: Mapping[str, Any], baseline: str, set_notes: Mapping[str, str] | None, lead_with_classes: set[str] = frozenset()
) -> str:
    """The results.md body: title, how to read the numbers, the table, then any per-set notes."""
    names = _model_names(results, baseline)
    others = [n for n in names if n != baseline] if baseline in results else []
    title = "# Retrieval: " + " vs ".join(_label(n) for n in names) if names else "# Retrieval"
    if len(others) == 1:
        delta = f" Delta is {_label(others[0])} minus {_label(baseline)}."
    elif others:
        delta = f" Each delta column is that model minus {_label(baseline)}."
    else:
        delta = ""
    text = (
        f"{title}\n\n"
        "R@K is the percentage of queries whose correct match is ranked in the top K "
        "(higher is better); mean/median rank is the rank of the first correct match "
        f"(lower is better).{delta}\n\n"
        f"{format_results_table(results, baseline, lead_with_classes)}\n"
    )
    if any(d in _CLASS_LEVEL for sets in results.values() for dirs in sets.values() for d in dirs):
        text += (
            "\nClass-level rows (sets with labels): `classification` is zero-shot classification of each image "
            "against prompt-ensemble class embeddings (top1, top5, macro_top1 = mean of per-class accuracy); "
            "`class_retrieval` counts a retrieved image as relevant when it has the query's class (t2i: one query per "
            "class prompt; i2i: every image against the others); `long_tail` averages per-class t2i R@1 and accuracy "
            "over head / medium / tail classes.\n"
        )
    if any(n in results for n in BASELINE_ROWS):
        text += (
            "\n`linear-probe` and `knn` are baselines on the frozen base model's image features, fitted on the labelled "
            "training set (regularisation C or k chosen on a held-out part of it): what the cheap options reach "
            "without adapting the model. They classify images, so they have class-level accuracy rows only.\n"
        )
    if set_notes:
        text += f"\n{format_set_notes(set_notes)}\n"
    return text


def _plot_groups(results: Mapping[str, Any], names: Sequence[str]) -> list[tuple[str, str, list[str]]]:
    """(set, direction, recall metrics sorted by K) for each group that has any R@K value."""
    groups: dict[tuple[str, str], list[str]] = {}
    for eval_set, direction, metric, _values in _table_rows(results, names):
        if _RECALL_RE.match(metric):
            groups.setdefault((eval_set, direction), []).append(metric)  # rows come sorted by K
    return [(s, d, m) for (s, d), m in groups.items()]


def _save_results_png(results: Mapping[str, Any], baseline: str, fh: IO[bytes]) -> None:
    """Grouped bar chart: one panel per (set, direction), one bar per model for each R@K."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training boxes have no display
    import matplotlib.pyplot as plt

    names = _model_names(results, baseline)
    groups = _plot_groups(results, names)
    n_panels = max(len(groups), 1)
    width_in, height_in = 4.2 * n_panels + 0.9, 4.6
    fig, axes = plt.subplots(1, n_panels, figsize=(width_in, height_in), sharey=True, squeeze=False)
    # Fixed margins in inches rather than constrained layout: same look, half the render time.
    fig.subplots_adjust(
        left=0.75 / width_in,
        right=1 - 0.15 / width_in,
        bottom=0.85 / height_in,
        top=1 - 0.75 / height_in,
        wspace=0.08,
    )
    try:
        axes = axes[0]
        colors, others = {}, iter(_MODEL_COLORS * (len(names) // len(_MODEL_COLORS) + 1))
        for name in names:
            colors[name] = _BASELINE_COLOR if name == baseline else next(others)
        width = 0.76 / max(len(names), 1)  # the bars of one R@K fill 76% of its slot
        fontsize = 8 if len(names) <= 2 else 6
        if not groups:
            axes[0].text(0.5, 0.5, "no recall metrics", ha="center", va="center", transform=axes[0].transAxes)
        for ax, (eval_set, direction, metrics) in zip(axes, groups):
            x = np.arange(len(metrics))
            for i, name in enumerate(names):
                values = [_lookup(results, name, eval_set, direction, m) for m in metrics]
                heights = [0.0 if v is None else float(v) for v in values]
                offset = (i - (len(names) - 1) / 2) * width
                bars = ax.bar(x + offset, heights, width, label=_label(name), color=colors[name])
                texts = ["-" if v is None else f"{float(v):.1f}" for v in values]
                # Labels of tall bars go inside the bar so they never collide with the title.
                tall = [h > _LABEL_INSIDE_ABOVE for h in heights]
                ax.bar_label(bars, labels=[t if not hi else "" for t, hi in zip(texts, tall)], padding=2, fontsize=fontsize)
                ax.bar_label(bars, labels=[t if hi else "" for t, hi in zip(texts, tall)], padding=-11, fontsize=fontsize, color="white")
            ax.set_xticks(x, metrics)
            ax.set_title(f"{eval_set}: {_DIRECTION_LABELS.get(direction, direction)}")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
        axes[0].set_ylim(0, 100)
        axes[0].set_ylabel("Recall (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncols=len(handles), frameon=False)
        fig.suptitle("Retrieval recall: " + " vs ".join(_label(n) for n in names) if names else "Retrieval recall")
        fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)
