"""Pick the adapter scale from an alpha sweep: target gain against source retention.

`results` are named rows as finetune/evaluation/report.py takes them: ``{"alpha=0.5": {set: {direction: {metric}}}}``.
The rule (recipe `export:` section): the alpha with the best target `select_metric` in
`select_direction` whose source score stays >= `min_source_retention` x the alpha=0 (zero-shot) source
score. alpha=0 is the reference, never a candidate: it always keeps 100% of the source but ships the
base unchanged. Ties go to the smaller alpha (closer to the base). Without a source set every alpha
qualifies. When no alpha > 0 qualifies: `if_no_alpha_qualifies: error` stops with the table,
`most_retention` takes the alpha > 0 with the best source score.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.errors import ExportError
from finetune.io import atomic_open


def alpha_name(alpha: float) -> str:
    return f"alpha={alpha:g}"


@dataclass(frozen=True)
class AlphaChoice:
    alpha: float
    reason: str
    rows: list[dict]  # one per alpha: alpha, target, source, retention, qualifies


def choose_alpha(
    results: dict[str, dict],
    alphas: list[float],
    *,
    direction: str,
    metric: str,
    min_source_retention: float,
    if_none: str,
) -> AlphaChoice:
    if 0.0 not in alphas:
        raise ExportError("the alpha sweep must include 0 (the base model): source retention is measured against it")
    if not any(a > 0 for a in alphas):
        raise ExportError("the alpha sweep needs at least one alpha > 0 to choose from")
    base = results[alpha_name(0.0)]
    has_source = "source" in base
    base_source = float(base["source"][direction][metric]) if has_source else None
    rows = []
    for alpha in alphas:
        res = results[alpha_name(alpha)]
        target = float(res["target"][direction][metric])
        source = float(res["source"][direction][metric]) if has_source else None
        if has_source:
            retention = source / base_source if base_source > 0 else 1.0
            qualifies = source >= min_source_retention * base_source
        else:
            retention, qualifies = None, True
        rows.append(dict(alpha=alpha, target=target, source=source, retention=retention, qualifies=qualifies))

    ok = [r for r in rows if r["qualifies"] and r["alpha"] > 0]
    what = f"target {direction} {metric}"
    if ok:
        best = max(ok, key=lambda r: (r["target"], -r["alpha"]))
        reason = (
            f"best {what} ({best['target']:.2f}) among alphas keeping source {direction} {metric} >= "
            f"{min_source_retention:.0%} of zero-shot ({base_source:.2f})"
            if has_source
            else f"best {what} (no source set)"
        )
        return AlphaChoice(best["alpha"], reason, rows)
    table = format_alpha_table(rows, direction, metric)
    if if_none == "error":
        raise ExportError(
            f"no alpha > 0 in the sweep keeps source {direction} {metric} >= {min_source_retention:.0%} of zero-shot "
            f"({base_source:.2f}):\n{table}\nLower export.min_source_retention, sweep smaller alphas, or set "
            "export.if_no_alpha_qualifies: most_retention."
        )
    best = max((r for r in rows if r["alpha"] > 0), key=lambda r: (r["source"], -r["alpha"]))
    return AlphaChoice(best["alpha"], f"no alpha > 0 keeps {min_source_retention:.0%} of source {metric}; took the best source score", rows)


def format_alpha_table(rows: list[dict], direction: str, metric: str) -> str:
    header = f"| alpha | target {direction} {metric} | source {direction} {metric} | source retention | meets rule |"
    lines = [header, "|---:|---:|---:|---:|:---:|"]
    for r in rows:
        source = "-" if r["source"] is None else f"{r['source']:.2f}"
        retention = "-" if r["retention"] is None else f"{100 * r['retention']:.1f}%"
        lines.append(f"| {r['alpha']:g} | {r['target']:.2f} | {source} | {retention} | {'yes' if r['qualifies'] else 'no'} |")
    return "\n".join(lines)


def save_alpha_curve(rows: list[dict], chosen: float, direction: str, metric: str, path, min_source_retention: float | None = None) -> None:
    """PNG: target gain over alpha=0 (y) against source retention (x), one labelled point per alpha."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_target = next(r["target"] for r in rows if r["alpha"] == 0.0)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    has_source = rows[0]["retention"] is not None
    xs = [100 * r["retention"] if has_source else r["alpha"] for r in rows]
    ys = [r["target"] - base_target for r in rows]
    ax.plot(xs, ys, "-o", color="#1f77b4")
    if has_source and min_source_retention is not None:
        ax.axvline(100 * min_source_retention, ls="--", color="#9e9e9e", label=f"rule: source >= {min_source_retention:.0%}")
    for x, y, r in zip(xs, ys, rows):
        ax.annotate(f"α={r['alpha']:g}", (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9)
        if r["alpha"] == chosen:
            ax.plot([x], [y], "o", ms=13, mfc="none", mec="#d62728", mew=2, label=f"chosen α={chosen:g}")
    ax.set_xlabel(f"source {direction} {metric}, % of zero-shot" if has_source else "alpha")
    ax.set_ylabel(f"target {direction} {metric} gain over zero-shot (points)")
    ax.set_title("Adapter scale: target gain vs source retention")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_open(path) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
