"""Ablations on the offline demo: replay against forgetting, and long-tail sampling / class weights.

    python scripts/ablate_demo.py                         # both studies, runs under runs/ablate/
    python scripts/ablate_demo.py --study replay          # replay 0 / 10 / 25% of source-domain data
    python scripts/ablate_demo.py --study longtail        # uniform / class-balanced / square-root x class weights
    python scripts/ablate_demo.py --out runs/ablate2 --steps 100 --set train.batch_size=64   # a cheaper study

Every variant is `finetune/train.py recipes/demo.yaml` with the same steps, seed and eval sets, plus
its overrides (printed). A variant whose folder already holds eval/results.json is read, not re-run,
so an interrupted study continues where it stopped. Prints two markdown tables and writes
`ablation.md`, `ablation.json` and `ablation.png` into --out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from finetune.io import atomic_open, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
REPLAY_SET = "{synthetic: {domain: source, num_images: 1500, captions_per_image: 2, seed: 2}, fraction: %s}"

VARIANTS: dict[str, list[str]] = {
    # no replay, uniform sampling, no class weights: the demo itself (shared by both studies)
    "uniform": ["data.replay=[]", "sampling.kind=uniform", "loss.class_weights=none"],
    "replay10": [f"data.replay=[{REPLAY_SET % 0.10}]", "sampling.kind=uniform", "loss.class_weights=none"],
    "replay25": [f"data.replay=[{REPLAY_SET % 0.25}]", "sampling.kind=uniform", "loss.class_weights=none"],
    "uniform+weights": ["data.replay=[]", "sampling.kind=uniform", "loss.class_weights=inverse_frequency"],
    "class_balanced": ["data.replay=[]", "sampling.kind=class_balanced", "loss.class_weights=none"],
    "class_balanced+weights": ["data.replay=[]", "sampling.kind=class_balanced", "loss.class_weights=inverse_frequency"],
    "sqrt": ["data.replay=[]", "sampling.kind=power", "sampling.power=0.5", "loss.class_weights=none"],
    "sqrt+weights": ["data.replay=[]", "sampling.kind=power", "sampling.power=0.5", "loss.class_weights=inverse_frequency"],
}
STUDIES = {
    "replay": ["uniform", "replay10", "replay25"],
    "longtail": ["uniform", "uniform+weights", "class_balanced", "class_balanced+weights", "sqrt", "sqrt+weights"],
}


def run_variant(name: str, out: Path, steps: int, recipe: str, extra: list[str] = ()) -> dict:
    folder = out / name
    results = folder / "eval" / "results.json"
    if not results.is_file():
        overrides = [*VARIANTS[name], *extra, f"train.output_dir={folder}", f"train.max_steps={steps}", "train.checkpoint_every_steps=null"]
        if (folder / "checkpoints").is_dir():
            overrides.append("train.resume_from=latest")
        command = [sys.executable, str(ROOT / "finetune" / "train.py"), recipe, *overrides]
        print(f"[{name}] {' '.join(command[1:])}", flush=True)
        with (out / f"{name}.log").open("w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if code != 0:
            raise SystemExit(f"variant {name} failed (exit {code}); see {out / f'{name}.log'}")
    return json.loads(results.read_text())


def _get(results: dict, *keys):
    node = results
    for key in keys:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _cell(value, signed: bool = False) -> str:
    return "-" if value is None else (f"{value:+.2f}" if signed else f"{value:.2f}")


def replay_rows(runs: dict[str, dict]) -> list[dict]:
    zero = runs["uniform"]["zero_shot"]
    rows = [
        {"model": "zero-shot", "target_t2i_R@1": _get(zero, "target", "t2i", "R@1"), "source_t2i_R@1": _get(zero, "source", "t2i", "R@1")}
    ]
    for name, label in (("uniform", "replay 0%"), ("replay10", "replay 10%"), ("replay25", "replay 25%")):
        if name in runs:
            adapted = runs[name]["adapted"]
            rows.append(
                {
                    "model": label,
                    "target_t2i_R@1": _get(adapted, "target", "t2i", "R@1"),
                    "source_t2i_R@1": _get(adapted, "source", "t2i", "R@1"),
                }
            )
    for row in rows:
        row["target_gain"] = row["target_t2i_R@1"] - rows[0]["target_t2i_R@1"]
        row["source_retention_%"] = 100.0 * row["source_t2i_R@1"] / rows[0]["source_t2i_R@1"] if rows[0]["source_t2i_R@1"] else None
    return rows


def longtail_rows(runs: dict[str, dict]) -> list[dict]:
    def row(label, res):
        return {
            "model": label,
            "t2i_R@1": _get(res, "target", "t2i", "R@1"),
            "tail_t2i_R@1": _get(res, "target", "long_tail", "tail_t2i_R@1"),
            "head_t2i_R@1": _get(res, "target", "long_tail", "head_t2i_R@1"),
            "accuracy_top1": _get(res, "target", "classification", "top1"),
            "accuracy_macro": _get(res, "target", "classification", "macro_top1"),
            "tail_accuracy": _get(res, "target", "long_tail", "tail_accuracy"),
        }

    rows = [row("zero-shot", runs["uniform"]["zero_shot"])]
    rows += [row(name, runs[name]["adapted"]) for name in STUDIES["longtail"] if name in runs]
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for r in rows:
        cells = [r[k] if isinstance(r[k], str) else _cell(r[k], signed=k == "target_gain") for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(tables: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, len(tables), figsize=(7 * len(tables), 4.2), squeeze=False)
    try:
        for ax, (title, rows) in zip(axes[0], tables.items()):
            metrics = [k for k in rows[0] if k != "model" and not k.endswith("gain") and not k.endswith("%")]
            x = np.arange(len(metrics))
            width = 0.8 / len(rows)
            for i, r in enumerate(rows):
                ax.bar(x + (i - (len(rows) - 1) / 2) * width, [r[m] or 0.0 for m in metrics], width, label=r["model"])
            ax.set_xticks(x, metrics, fontsize=7, rotation=15)
            ax.set_ylim(0, 100)
            ax.set_title(title)
            ax.legend(fontsize=7)
            ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        with atomic_open(path) as fh:
            fig.savefig(fh, format="png", dpi=110)
    finally:
        plt.close(fig)


def add_study_arguments(parser: argparse.ArgumentParser, *, out: str) -> None:
    """--out, --steps, --recipe, --set: what every demo study takes."""
    parser.add_argument("--out", default=out)
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps of every variant (the demo: 400)")
    parser.add_argument("--recipe", default="recipes/demo.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra override for every variant")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", choices=["replay", "longtail", "both"], default="both")
    add_study_arguments(parser, out="runs/ablate")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = dict.fromkeys(n for s in (["replay", "longtail"] if args.study == "both" else [args.study]) for n in STUDIES[s])
    runs = {name: run_variant(name, out, args.steps, args.recipe, args.set) for name in names}
    tables = {}
    if args.study in ("replay", "both"):
        tables["replay (text->image R@1, same steps)"] = replay_rows(runs)
    if args.study in ("longtail", "both"):
        tables["long tail (target)"] = longtail_rows(runs)
    settings = ", ".join([f"{args.steps} steps", *args.set])
    text = (
        f"# Demo ablations ({settings}; every variant the same)\n\n"
        + "\n\n".join(f"## {t}\n\n{markdown(r)}" for t, r in tables.items())
        + "\n"
    )
    print(text)
    atomic_write_text(out / "ablation.md", text)
    atomic_write_text(out / "ablation.json", json.dumps(tables, indent=2) + "\n")
    save_plot(tables, out / "ablation.png")
    print(f"Wrote {out / 'ablation.md'}, {out / 'ablation.json'}, {out / 'ablation.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
