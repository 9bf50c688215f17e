"""Ablation on the offline demo: where negatives come from, which loss reads them, and augmentation.

    python scripts/ablate_negatives.py                       # every variant, runs under runs/ablate_negatives/
    python scripts/ablate_negatives.py --variants infonce mined siglip
    python scripts/ablate_negatives.py --steps 100 --out runs/abl-quick   # a cheaper study

Every variant is `finetune/train.py recipes/demo.yaml` with the same steps, seed, data, replay and eval
sets, plus its overrides (printed, and listed below). What changes is only the negatives or the loss:

    infonce      in-batch symmetric InfoNCE (the demo as shipped)
    mined        + offline cross-modal mined negatives placed in each anchor's batch (mining.enabled)
    mined_refresh  mined, re-mined with the adapted model every 100 steps
    hn_infonce   hardness-weighted InfoNCE (HN-NCE, beta 0.5), in-batch negatives
    siglip       SigLIP pairwise sigmoid loss (its own learned temperature and bias)
    vsepp        VSE++ max-violation triplet (hardest in-batch negative, margin 0.2)
    semihard     semi-hard triplet (margin 0.2); margin_ranking: hinge over every negative (margin 0.2)
    infonce+siglip, infonce+adversarial   InfoNCE plus 0.5 SigLIP, or plus a 0.1 modality discriminator
    augment      InfoNCE + mild image augmentation (crop 0.9-1.0 area, rotation 5 deg). The demo's
                 captions name position, size and colour, so flips and colour jitter would make them false.
    augment_text InfoNCE + text augmentation (word dropout 0.1, one adjacent swap with p 0.2)

Each variant's wall time (training + both evaluations, one process) is measured around the run and
kept in its folder, so an interrupted study continues where it stopped and reads finished variants
back. Prints one markdown table and writes `ablation.md`, `ablation.json` and `ablation.png` into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from finetune.io import atomic_open, atomic_write_text
from scripts.ablate_demo import _get, add_study_arguments

ROOT = Path(__file__).resolve().parent.parent

VARIANTS: dict[str, list[str]] = {
    "infonce": ["loss.terms=[infonce]"],
    "mined": ["loss.terms=[infonce]", "mining.enabled=true"],
    "mined_refresh": ["loss.terms=[infonce]", "mining.enabled=true", "mining.refresh_every_steps=100"],
    "hn_infonce": ["loss.terms=[{name: hn_infonce, beta: 0.5}]"],
    "siglip": ["loss.terms=[siglip]"],
    "vsepp": ["loss.terms=[{name: vsepp, margin: 0.2}]"],
    "semihard": ["loss.terms=[{name: semihard, margin: 0.2}]"],
    "margin_ranking": ["loss.terms=[{name: margin_ranking, margin: 0.2}]"],
    "infonce+siglip": ["loss.terms=[infonce, {name: siglip, weight: 0.5}]"],
    "infonce+adversarial": ["loss.terms=[infonce, {name: adversarial, weight: 0.1}]"],
    "augment": [
        "loss.terms=[infonce]",
        "augment.image.random_resized_crop.enabled=true",
        "augment.image.random_resized_crop.scale=[0.9,1.0]",
        "augment.image.rotation.enabled=true",
        "augment.image.rotation.degrees=5",
    ],
    "augment_text": ["loss.terms=[infonce]", "augment.text.word_dropout=0.1", "augment.text.word_swap=0.2"],
}
LABELS = {
    "infonce": "in-batch InfoNCE",
    "mined": "+ mined negatives",
    "mined_refresh": "+ mined, refreshed every 100 steps",
    "hn_infonce": "hardness-weighted InfoNCE (beta 0.5)",
    "siglip": "SigLIP",
    "vsepp": "VSE++ (margin 0.2)",
    "semihard": "semi-hard triplet (margin 0.2)",
    "margin_ranking": "margin ranking (margin 0.2)",
    "infonce+siglip": "InfoNCE + 0.5 SigLIP",
    "infonce+adversarial": "InfoNCE + 0.1 modality-adversarial",
    "augment": "InfoNCE + image augmentation",
    "augment_text": "InfoNCE + text augmentation",
}


def run_variant(name: str, out: Path, steps: int, recipe: str, extra: list[str]) -> dict:
    """eval/results.json of the variant (run now unless it already finished) plus its wall time in seconds."""
    folder = out / name
    results, timing = folder / "eval" / "results.json", folder / "ablation_wall_time.json"
    if not (results.is_file() and timing.is_file()):
        overrides = [*VARIANTS[name], *extra, f"train.output_dir={folder}", f"train.max_steps={steps}", "train.checkpoint_every_steps=null"]
        if (folder / "checkpoints").is_dir():
            overrides.append("train.resume_from=latest")
        command = [sys.executable, str(ROOT / "finetune" / "train.py"), recipe, *overrides]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        start = time.perf_counter()
        with (out / f"{name}.log").open("w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0:
            raise SystemExit(f"variant {name} failed (exit {code}); see {out / f'{name}.log'}")
        atomic_write_text(timing, json.dumps({"wall_time_s": round(time.perf_counter() - start, 1)}) + "\n")
    return {**json.loads(results.read_text()), **json.loads(timing.read_text())}


def table_rows(runs: dict[str, dict]) -> list[dict]:
    """One row per variant (and zero-shot first): target recall both directions, source retention, wall time."""
    first = next(iter(runs.values()))["zero_shot"]
    zero_source = _get(first, "source", "t2i", "R@1")

    def row(label: str, res: dict, wall: float | None) -> dict:
        source = _get(res, "source", "t2i", "R@1")
        return {
            "variant": label,
            "t2i R@1": _get(res, "target", "t2i", "R@1"),
            "t2i R@5": _get(res, "target", "t2i", "R@5"),
            "i2t R@1": _get(res, "target", "i2t", "R@1"),
            "i2t R@5": _get(res, "target", "i2t", "R@5"),
            "source t2i R@1": source,
            "source retention %": 100.0 * source / zero_source if source is not None and zero_source else None,
            "wall s": wall,
        }

    rows = [row("zero-shot", first, None)]
    rows += [row(LABELS[name], res["adapted"], res["wall_time_s"]) for name, res in runs.items()]
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|---|" + "--:|" * (len(keys) - 1)]
    for r in rows:
        cells = [
            r[k]
            if isinstance(r[k], str)
            else ("-" if r[k] is None else f"{r[k]:.1f}" if k in ("wall s", "source retention %") else f"{r[k]:.2f}")
            for k in keys
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(rows: list[dict], path: Path) -> None:
    """One horizontal bar panel per metric, a bar per variant (13 variants stay readable), zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["t2i R@1", "i2t R@1", "source t2i R@1"]
    variants = [r for r in rows if r["variant"] != "zero-shot"]
    zero = rows[0]
    fig, axes = plt.subplots(1, len(metrics), figsize=(13, 0.38 * len(variants) + 1.6), sharey=True)
    try:
        y = range(len(variants))
        for ax, metric in zip(axes, metrics):
            values = [r[metric] or 0.0 for r in variants]
            ax.barh(list(y), values, color=["tab:blue" if i == 0 else "tab:gray" for i in y])
            ax.axvline(variants[0][metric] or 0.0, color="tab:blue", lw=0.8)  # the in-batch InfoNCE baseline
            ax.axvline(zero[metric] or 0.0, color="black", ls="--", lw=0.8, label="zero-shot")
            for i, v in zip(y, values):
                ax.text(v + 0.8, i, f"{v:.1f}", va="center", fontsize=7)
            ax.set_xlim(0, 100)
            ax.set_title(("target " if not metric.startswith("source") else "") + metric, fontsize=9)
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(list(y), [r["variant"] for r in variants], fontsize=8)
        axes[0].invert_yaxis()
        axes[-1].legend(fontsize=7, loc="lower right")
        fig.suptitle("negatives, losses and augmentation on the demo (recall %, same steps and seed)", fontsize=10)
        fig.tight_layout()
        with atomic_open(path) as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="which variants, in table order")
    add_study_arguments(parser, out="runs/ablate_negatives")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = {name: run_variant(name, out, args.steps, args.recipe, args.set) for name in args.variants}
    rows = table_rows(runs)
    settings = ", ".join([f"{args.steps} steps", *args.set])
    text = (
        f"# Negatives, losses and augmentation on the demo ({settings}; same seed, data and replay for every variant)\n\n"
        f"{markdown(rows)}\n\nTarget recall in %, both directions; source retention = adapted / zero-shot source t2i R@1.\n"
    )
    print(text)
    atomic_write_text(out / "ablation.md", text)
    atomic_write_text(
        out / "ablation.json", json.dumps({"rows": rows, "overrides": {n: VARIANTS[n] for n in args.variants}}, indent=2) + "\n"
    )
    save_plot(rows, out / "ablation.png")
    print(f"Wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
