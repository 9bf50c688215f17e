"""Retrieval metrics and result reporting for zero-shot vs adapted CLIP.

Everything here is a pure function of tensors or plain dicts (no model code), so the numbers a run
reports can be unit-tested by hand and recomputed offline from saved embeddings.

Retrieval follows the multi-caption definition used by CLIP_benchmark: an image may have several
captions; text->image asks whether a caption's own image ranks high, image->text asks whether *any*
of the image's captions ranks high.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["retrieval_metrics", "format_results_table", "write_results"]

# Query rows scored at once. 1024 x 50k float32 is ~200 MB, a bounded cost even for a 50k x 50k
# eval set whose full similarity matrix (~10 GB) would not fit comfortably.
DEFAULT_CHUNK_SIZE = 1024

# Orders used for tables and plots: target first (what we adapt to), then source (what we must not
# forget); text->image before image->text. Unknown names follow, sorted, so nothing is dropped.
_RESULT_SIDES = ("zero_shot", "adapted")
_SET_ORDER = ("target", "source")
_DIRECTION_ORDER = ("t2i", "i2t")
_DIRECTION_LABELS = {"t2i": "text->image", "i2t": "image->text"}
_RECALL_RE = re.compile(r"^R@(\d+)$")
_LABEL_INSIDE_ABOVE = 90.0  # bar height (%) above which its value label is drawn inside the bar


# --------------------------------------------------------------------------------------------------
# Retrieval metrics
# --------------------------------------------------------------------------------------------------


def retrieval_metrics(
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    text_to_image: torch.Tensor,
    ks: Sequence[int] = (1, 5, 10),
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> dict[str, dict[str, float]]:
    """Recall@K and mean/median rank for text->image and image->text retrieval.

    Embeddings are L2-normalised here (in float32) so callers can pass raw encoder outputs and the
    score is always cosine similarity. Ranks count only *strictly* higher scores, so ties are
    resolved in the query's favour, matching CLIP_benchmark.

    Args:
        image_emb: (N_img, D) image embeddings, any scale.
        text_emb: (N_txt, D) caption embeddings, any scale.
        text_to_image: (N_txt,) integer index of each caption's image. Every image needs at least
            one caption, otherwise its image->text rank is undefined.
        ks: the K values for Recall@K; each gives a key ``f"R@{k}"``.
        chunk_size: query rows scored at once; bounds peak memory, never changes the result.

    Returns:
        ``{"t2i": {...}, "i2t": {...}}``, each with ``R@K`` in percent (0-100), ``mean_rank`` and
        ``median_rank`` (1 is best), as plain Python floats.

    Raises:
        ValueError: on malformed shapes, out-of-range indices or images without captions.
    """
    ks = _validate_ks(ks)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    text_to_image = torch.as_tensor(text_to_image)
    _validate_inputs(image_emb, text_emb, text_to_image)

    device = image_emb.device
    with torch.no_grad():
        img = F.normalize(image_emb.detach().to(device=device, dtype=torch.float32), dim=-1)
        txt = F.normalize(text_emb.detach().to(device=device, dtype=torch.float32), dim=-1)
        t2i_idx = text_to_image.detach().to(device=device, dtype=torch.long)  # (N_txt,)

        t2i_ranks = _text_to_image_ranks(img, txt, t2i_idx, chunk_size)  # (N_txt,)
        i2t_ranks = _image_to_text_ranks(img, txt, t2i_idx, chunk_size)  # (N_img,)

    return {
        "t2i": _summarise_ranks(t2i_ranks, ks),
        "i2t": _summarise_ranks(i2t_ranks, ks),
    }


def _validate_ks(ks: Iterable[int]) -> tuple[int, ...]:
    """Reject K values that would silently produce meaningless keys such as ``R@0``."""
    ks = tuple(ks)
    if not ks:
        raise ValueError("ks must contain at least one K")
    for k in ks:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"every K in ks must be a positive int, got {k!r}")
    return tuple(int(k) for k in ks)


def _validate_inputs(
    image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image: torch.Tensor
) -> None:
    """Fail early with a message naming the offending shape, instead of a cryptic matmul error."""
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(emb).__name__}")
        if emb.ndim != 2:
            raise ValueError(f"{name} must be 2-D (N, D), got shape {tuple(emb.shape)}")
        if emb.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(emb.shape)})")
    n_img, d_img = image_emb.shape
    n_txt, d_txt = text_emb.shape
    if d_img != d_txt:
        raise ValueError(
            f"embedding dims differ: image_emb has D={d_img}, text_emb has D={d_txt}"
        )
    if text_to_image.ndim != 1 or text_to_image.shape[0] != n_txt:
        raise ValueError(
            f"text_to_image must have shape (N_txt,) = ({n_txt},), "
            f"got {tuple(text_to_image.shape)}"
        )
    if text_to_image.dtype == torch.bool or text_to_image.is_floating_point() or (
        text_to_image.is_complex()
    ):
        raise ValueError(f"text_to_image must hold integer indices, got dtype {text_to_image.dtype}")
    lo, hi = int(text_to_image.min()), int(text_to_image.max())
    if lo < 0 or hi >= n_img:
        raise ValueError(
            f"text_to_image indices must be in [0, {n_img - 1}] (N_img={n_img}), "
            f"got values in [{lo}, {hi}]"
        )
    counts = torch.bincount(text_to_image.to(torch.long).cpu(), minlength=n_img)  # (N_img,)
    n_orphans = int((counts == 0).sum())
    if n_orphans:
        raise ValueError(
            f"{n_orphans} image(s) have no caption in text_to_image; image->text rank is "
            f"undefined for them (first: index {int(torch.nonzero(counts == 0)[0])})"
        )


def _text_to_image_ranks(
    img: torch.Tensor, txt: torch.Tensor, t2i_idx: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Rank of each caption's own image among all images, scoring caption chunks at a time."""
    n_txt = txt.shape[0]
    ranks = torch.empty(n_txt, dtype=torch.long, device=img.device)  # (N_txt,)
    for start in range(0, n_txt, chunk_size):
        end = min(start + chunk_size, n_txt)
        sim = txt[start:end] @ img.T  # (B, N_img)
        # Own score read from the same matrix, so the comparison below is exact (no 1-ulp drift
        # between two ways of computing the same dot product).
        own = sim.gather(1, t2i_idx[start:end, None])  # (B, 1)
        ranks[start:end] = 1 + (sim > own).sum(dim=1)
    return ranks.cpu()


def _image_to_text_ranks(
    img: torch.Tensor, txt: torch.Tensor, t2i_idx: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Rank of each image's best-scoring own caption among all captions, image chunks at a time."""
    n_img = img.shape[0]
    ranks = torch.empty(n_img, dtype=torch.long, device=img.device)  # (N_img,)
    for start in range(0, n_img, chunk_size):
        end = min(start + chunk_size, n_img)
        sim = img[start:end] @ txt.T  # (B, N_txt)
        # Captions belonging to images of this chunk, and their (row, column) in `sim`.
        cap = torch.nonzero((t2i_idx >= start) & (t2i_idx < end)).squeeze(1)  # (C,)
        rows = t2i_idx[cap] - start  # (C,)
        own_scores = sim[rows, cap]  # (C,)
        best = torch.full((end - start,), -math.inf, dtype=sim.dtype, device=sim.device)  # (B,)
        best = best.scatter_reduce(0, rows, own_scores, reduce="amax", include_self=True)
        ranks[start:end] = 1 + (sim > best[:, None]).sum(dim=1)
    return ranks.cpu()


def _summarise_ranks(ranks: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """Turn 1-based ranks into R@K (percent) plus mean and median rank as plain floats.

    numpy's median is used on purpose: torch.median returns the lower middle value for an even
    count, which biases the reported median rank downwards.
    """
    r = ranks.numpy().astype(np.int64)  # (N_query,)
    out: dict[str, float] = {f"R@{k}": float(100.0 * np.mean(r <= k)) for k in ks}
    out["mean_rank"] = float(np.mean(r))
    out["median_rank"] = float(np.median(r))
    return out


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _ordered(names: Iterable[str], preferred: Sequence[str]) -> list[str]:
    """Preferred names first in their given order, then the rest sorted, so output is stable."""
    names = set(names)
    return [n for n in preferred if n in names] + sorted(names - set(preferred))


def _metric_sort_key(name: str) -> tuple[int, float, str]:
    """R@K by increasing K, then mean_rank, median_rank, then anything else alphabetically."""
    m = _RECALL_RE.match(name)
    if m:
        return (0, float(m.group(1)), name)
    fixed = {"mean_rank": 1, "median_rank": 2}
    return (fixed.get(name, 3), 0.0, name)


def _check_results(results: Mapping[str, Any]) -> None:
    """Catch typos like ``"zeroshot"`` that would otherwise silently print a table of dashes."""
    if not isinstance(results, Mapping):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    unknown = set(results) - set(_RESULT_SIDES)
    if unknown:
        raise ValueError(
            f"unknown top-level result keys {sorted(unknown)}; expected any of {list(_RESULT_SIDES)}"
        )


def _lookup(results: Mapping[str, Any], side: str, eval_set: str, direction: str, metric: str):
    """Value at results[side][eval_set][direction][metric], or None when any level is missing."""
    node: Any = results
    for key in (side, eval_set, direction, metric):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _table_rows(results: Mapping[str, Any]) -> list[tuple[str, str, str, Any, Any]]:
    """(set, direction, metric, zero_shot, adapted) for every metric present on either side."""
    sets = _ordered(
        (s for side in _RESULT_SIDES for s in (results.get(side) or {})), _SET_ORDER
    )
    rows = []
    for eval_set in sets:
        directions = _ordered(
            (
                d
                for side in _RESULT_SIDES
                for d in ((results.get(side) or {}).get(eval_set) or {})
            ),
            _DIRECTION_ORDER,
        )
        for direction in directions:
            metrics: set[str] = set()
            for side in _RESULT_SIDES:
                metrics |= set(
                    ((results.get(side) or {}).get(eval_set) or {}).get(direction) or {}
                )
            for metric in sorted(metrics, key=_metric_sort_key):
                zs = _lookup(results, "zero_shot", eval_set, direction, metric)
                ad = _lookup(results, "adapted", eval_set, direction, metric)
                rows.append((eval_set, direction, metric, zs, ad))
    return rows


def _fmt(value: Any, signed: bool = False) -> str:
    """Two decimals (with explicit sign for deltas); missing values become '-'."""
    if value is None:
        return "-"
    value = float(value)
    if signed and round(value, 2) == 0:
        return "+0.00"  # avoid a misleading "-0.00" for a tiny negative difference
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def format_results_table(results: dict) -> str:
    """Markdown table comparing zero-shot and adapted retrieval, one row per metric.

    The columns are padded so the same string reads well on a terminal and renders as a table in
    results.md. ``delta`` is always adapted - zero_shot; for ranks lower is better, so a negative
    delta there is an improvement.

    Args:
        results: ``{"zero_shot"|"adapted": {"target"|"source": {"t2i"|"i2t": {metric: value}}}}``;
            either side or any eval set may be missing, shown as "-".
    """
    _check_results(results)
    header = ("set", "direction", "metric", "zero-shot", "adapted", "delta")
    right_aligned = (False, False, False, True, True, True)
    body = []
    for eval_set, direction, metric, zs, ad in _table_rows(results):
        delta = None if zs is None or ad is None else float(ad) - float(zs)
        body.append((eval_set, direction, metric, _fmt(zs), _fmt(ad), _fmt(delta, signed=True)))

    widths = [max(len(str(row[i])) for row in [header, *body]) for i in range(len(header))]
    widths = [max(w, 3) for w in widths]  # markdown needs at least '---' in the rule row

    def line(cells: Sequence[str]) -> str:
        padded = [
            c.rjust(w) if right else c.ljust(w)
            for c, w, right in zip(cells, widths, right_aligned)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        ("-" * (w + 1) + ":") if right else (":" + "-" * (w + 1))
        for w, right in zip(widths, right_aligned)
    ) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in body)])


def _json_default(obj: Any) -> Any:
    """Serialise numpy/torch scalars and small arrays that callers may leave in results."""
    if isinstance(obj, (np.generic, torch.Tensor)) and getattr(obj, "ndim", 0) == 0:
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see half a file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise


def _results_markdown(results: Mapping[str, Any]) -> str:
    """The results.md body: title, how to read R@K, then the comparison table."""
    return (
        "# Retrieval: zero-shot vs adapted\n\n"
        "R@K is the percentage of queries whose correct match is ranked in the top K "
        "(higher is better); mean/median rank is the rank of the first correct match "
        "(lower is better). Delta is adapted minus zero-shot.\n\n"
        f"{format_results_table(results)}\n"
    )


def _plot_groups(results: Mapping[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(set, direction, recall metrics sorted by K) for each group that has any R@K value."""
    groups: dict[tuple[str, str], set[str]] = {}
    for eval_set, direction, metric, _zs, _ad in _table_rows(results):
        if _RECALL_RE.match(metric):
            groups.setdefault((eval_set, direction), set()).add(metric)
    return [(s, d, sorted(m, key=_metric_sort_key)) for (s, d), m in groups.items()]


def _save_results_png(results: Mapping[str, Any], fh: IO[bytes]) -> None:
    """Grouped bar chart: one panel per (set, direction), zero-shot vs adapted bars per R@K."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training boxes have no display
    import matplotlib.pyplot as plt

    groups = _plot_groups(results)
    n_panels = max(len(groups), 1)
    width_in, height_in = 4.2 * n_panels + 0.9, 4.6
    fig, axes = plt.subplots(
        1, n_panels, figsize=(width_in, height_in), sharey=True, squeeze=False
    )
    # Fixed margins in inches rather than constrained layout: same look, half the render time.
    fig.subplots_adjust(
        left=0.75 / width_in, right=1 - 0.15 / width_in,
        bottom=0.85 / height_in, top=1 - 0.75 / height_in, wspace=0.08,
    )
    try:
        axes = axes[0]
        sides = (("zero_shot", "zero-shot", "#9e9e9e"), ("adapted", "adapted", "#1f77b4"))
        width = 0.38
        if not groups:
            axes[0].text(0.5, 0.5, "no recall metrics", ha="center", va="center",
                         transform=axes[0].transAxes)
        for ax, (eval_set, direction, metrics) in zip(axes, groups):
            x = np.arange(len(metrics))
            for i, (side, label, color) in enumerate(sides):
                values = [_lookup(results, side, eval_set, direction, m) for m in metrics]
                heights = [0.0 if v is None else float(v) for v in values]
                bars = ax.bar(x + (i - 0.5) * width, heights, width, label=label, color=color)
                texts = ["-" if v is None else f"{float(v):.1f}" for v in values]
                # Labels of tall bars go inside the bar so they never collide with the title.
                tall = [h > _LABEL_INSIDE_ABOVE for h in heights]
                ax.bar_label(bars, labels=[t if not hi else "" for t, hi in zip(texts, tall)],
                             padding=2, fontsize=8)
                ax.bar_label(bars, labels=[t if hi else "" for t, hi in zip(texts, tall)],
                             padding=-11, fontsize=8, color="white")
            ax.set_xticks(x, metrics)
            ax.set_title(f"{eval_set}: {_DIRECTION_LABELS.get(direction, direction)}")
            ax.grid(axis="y", alpha=0.3)
            ax.set_axisbelow(True)
        axes[0].set_ylim(0, 100)
        axes[0].set_ylabel("Recall (%)")
        handles, labels = axes[0].get_legend_handles_labels()
        if handles:
            fig.legend(handles, labels, loc="lower center", ncols=2, frameon=False)
        fig.suptitle("Retrieval recall: zero-shot vs adapted")
        fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)


def write_results(results: dict, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir`` (created if missing).

    Each file is written atomically so an interrupted run or a concurrent reader never sees a
    truncated report. The JSON has sorted keys so diffs between runs stay small.

    Returns:
        ``{"json": Path, "md": Path, "png": Path}`` of the written files.
    """
    _check_results(results)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}

    text_json = json.dumps(results, indent=2, sort_keys=True, default=_json_default) + "\n"
    _atomic_write(paths["json"], lambda fh: fh.write(text_json.encode("utf-8")))
    text_md = _results_markdown(results)
    _atomic_write(paths["md"], lambda fh: fh.write(text_md.encode("utf-8")))
    _atomic_write(paths["png"], lambda fh: _save_results_png(results, fh))
    return paths
