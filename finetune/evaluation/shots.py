"""`domainclip study shots`: the few-shot protocol of CLIP-LoRA on your own data. How many labelled images per
class does adaptation need, and does LoRA beat a linear probe on the frozen base model?

For every k in `shots` and every seed in range(`seeds`), one cell:

1. draw k images per class from data.train (`data.train.shots_per_class=k`, `shots_seed=seed`; the loader's
   draw, so the training run reads the same images);
2. fit a linear probe (finetune/evaluation/baselines.py) on the base model's L2-normalised image embeddings
   of those images, scored on the first eval set (data.eval.target, else the first language);
3. train the recipe's LoRA on them in this process (the real entry point, `finetune.train.run`) for a budget
   scaled to the subset (`step_budget`) and read its classification top-1 on the same set from the run's
   eval/results.json.

Zero-shot does not depend on the cell: the first cell that runs measures it once. A finished cell is written
to OUT/cells/k{k}_s{seed}.json and skipped when the study runs again; a cell cut short starts again from
scratch. OUT then holds shots.json (every cell and the mean / std / min / max per k), shots.md (the table)
and shots.png (top-1 against k).

What each cell's run overrides in the recipe (everything else, replay and mining included, stays as written):
the output folder, the step budget and batch, the seed (train.seed = the cell's seed: subset, LoRA init and
data order vary together), no resume, the final checkpoint only (deleted once the cell is written; the
adapter stays), no periodic eval, zero-shot once, the recipe's own baselines off (the study fits its own
probe), warmup shortened to at most a tenth of the budget, and the eval sets cut to the one scored (source
dropped; with a target, the languages too; when the first language is scored, the other languages stay, as an
override cannot drop one key of a mapping).
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetune.config.load import load_config
from finetune.config.schema import DatasetSpec, RecipeConfig
from finetune.errors import ConfigError
from finetune.io import atomic_open, atomic_write_text
from finetune.runfolder import CHECKPOINTS, EVAL, RESULTS_JSON
from finetune.timing import available_cores, machine

# The step budget of a cell: SHOT_EPOCHS passes over its images (k x C, fewer where a class is short), at
# most MAX_STEPS optimizer steps, with the recipe's batch capped at the number of images. While k x C fits in
# one batch every cell gets SHOT_EPOCHS steps of a batch that grows with k (the demo's whole sweep: 8 classes,
# batch 128); past it, steps grow with k up to MAX_STEPS. No floor is needed: the batch never exceeds the
# images, so a cell never gets fewer than SHOT_EPOCHS steps. On the demo, LoRA's 16-shot top-1 stops rising
# at about 100 steps (the check is in docs/evaluation.md) and the sweep takes minutes on two CPU cores.
SHOT_EPOCHS = 100
MAX_STEPS = 500
BUDGET_RULE = "steps = min(ceil(SHOT_EPOCHS x images / batch), MAX_STEPS), batch = min(train.batch_size, images)"

# Names inside the study folder.
CELLS = "cells"  # one JSON per finished (k, seed)
RUNS = "runs"  # one training run folder per cell
STUDY_CONFIG = "study.json"  # the recipe the cells belong to: a rerun with another refuses to mix them
ZERO_SHOT = "zero_shot.json"
CELL_LOG = "study.log"  # what the cell's training printed, beside its run
METRICS = ("top1", "macro_top1")


def step_budget(num_images: int, batch_size: int) -> tuple[int, int]:
    """(optimizer steps, batch size) for a cell of `num_images` training images (BUDGET_RULE)."""
    batch = min(batch_size, num_images)
    return min(math.ceil(SHOT_EPOCHS * num_images / batch), MAX_STEPS), batch


def cell_name(k: int, seed: int) -> str:
    return f"k{k}_s{seed}"


def first_eval_set(cfg: RecipeConfig) -> tuple[str, str, DatasetSpec]:
    """(name in results.json, recipe key, spec) of the set the study scores: data.eval.target, else the first language."""
    if cfg.data.eval.target is not None:
        return "target", "data.eval.target", cfg.data.eval.target
    code, spec = next(iter(cfg.data.eval.languages.items()))
    return code, f"data.eval.languages.{code}", spec


def study_problems(cfg: RecipeConfig) -> list[str]:
    """What keeps a recipe from a shots study (labels on both sides), each with its key and the fix."""
    problems = []
    if cfg.data.train.label_column is None:
        problems.append("data.train.label_column: a shots study draws k labelled images per class; set the class label column")
    _, key, spec = first_eval_set(cfg)
    if spec.label_column is None:
        problems.append(f"{key}.label_column: the study scores classification top-1 on {key}; set its class label column")
    return problems


def cell_overrides(cfg: RecipeConfig, run_dir: Path, k: int, seed: int, steps: int, batch: int, *, zero_shot: bool) -> list[str]:
    """The overrides one cell adds to the user's (see the module docstring for why each)."""
    overrides = [
        f"train.output_dir={json.dumps(str(run_dir))}",  # a JSON string is a YAML string: any path survives
        f"train.max_steps={steps}",
        "train.epochs=null",
        f"train.batch_size={batch}",
        f"train.seed={seed}",
        "train.resume_from=null",
        "train.checkpoint_every_steps=null",
        "eval.every_steps=null",
        f"eval.zero_shot={'true' if zero_shot else 'false'}",
        f"data.train.shots_per_class={k}",
        f"data.train.shots_seed={seed}",
        "eval.baselines=[]",  # the run's own probe and k-NN: the study fits its probe itself, once
    ]
    if cfg.train.micro_batch_size is not None:
        overrides.append(f"train.micro_batch_size={min(cfg.train.micro_batch_size, batch)}")
    if cfg.optim.warmup_steps is not None:
        overrides.append(f"optim.warmup_steps={min(cfg.optim.warmup_steps, steps // 10)}")
    overrides.append("data.eval.source=null")  # only the set the study scores
    if cfg.data.eval.target is not None:
        overrides.append("data.eval.languages=null")
    return overrides


# ----------------------------------------------------------------------------- the study


def run_shots_study(
    recipe: str,
    overrides: Sequence[str],
    *,
    shots: Sequence[int],
    seeds: int,
    out: str | Path | None,
    train: Callable[[RecipeConfig], int],
) -> dict:
    """Run (or finish) every (k, seed) cell, then write shots.json, shots.md and shots.png into `out`.

    `train` is the training entry point, `finetune.train.run`, called in this process once per cell. Returns
    the shots.json content; its "table" is the markdown table.
    """
    cfg = load_config(recipe, list(overrides))
    problems = study_problems(cfg)
    if problems:
        raise ConfigError(str(recipe), problems)
    out = Path(out) if out is not None else Path(cfg.train.output_dir) / "study_shots"
    claim_folder(out, recipe, overrides, cfg)
    cells = [(k, seed) for k in shots for seed in range(seeds)]
    runner = CellRunner(recipe, list(overrides), cfg, out, train)
    from tqdm.auto import tqdm

    progress = tqdm(cells, desc="study shots", unit="cell", file=sys.stderr)
    results = []
    for k, seed in progress:
        progress.set_postfix_str(f"k={k} seed={seed}")
        results.append(runner.cell(k, seed, progress))
    progress.close()
    zero_shot = json.loads((out / ZERO_SHOT).read_text())
    report = build_report(results, zero_shot, recipe=str(recipe), overrides=list(overrides), eval_set=runner.eval_name, shots=shots)
    write_report(report, out)
    return report


def claim_folder(out: Path, recipe: str, overrides: Sequence[str], cfg: RecipeConfig) -> None:
    """Record which recipe this folder's cells belong to; refuse a folder holding another's (never mix two studies)."""
    settings = study_settings(cfg)
    path = out / STUDY_CONFIG
    if path.is_file():
        held = json.loads(path.read_text())
        differences = _differences(held["settings"], settings)
        if differences:
            raise ConfigError(
                f"--out {out}",
                [
                    f"holds a study of another recipe or budget ({'; '.join(differences[:3])}): keep the recipe and "
                    "overrides to resume it, or pick another --out (or delete the folder) to start a new one"
                ],
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps({"recipe": str(recipe), "overrides": list(overrides), "settings": settings}, indent=2) + "\n")


def study_settings(cfg: RecipeConfig) -> dict:
    """What a cell's result depends on: the resolved recipe (its output folder aside) and the budget constants."""
    config = json.loads(json.dumps(cfg.model_dump(mode="json")))
    config["train"].pop("output_dir")
    return {"config": config, "budget": {"epochs": SHOT_EPOCHS, "max_steps": MAX_STEPS}}


def _differences(held, now, path: str = "") -> list[str]:
    if isinstance(held, dict) and isinstance(now, dict):
        return [d for key in sorted(set(held) | set(now)) for d in _differences(held.get(key), now.get(key), f"{path}.{key}".lstrip("."))]
    return [] if held == now else [f"{path}: {held!r} there, {now!r} now"]


class CellRunner:
    """Runs cells one at a time; holds what every cell shares (the base model and the eval set's features)."""

    def __init__(self, recipe: str, overrides: list[str], cfg: RecipeConfig, out: Path, train: Callable[[RecipeConfig], int]):
        self.recipe, self.overrides, self.cfg, self.out, self.train = recipe, overrides, cfg, out, train
        self.eval_name, self.eval_key, self.eval_spec = first_eval_set(cfg)
        self._base = None  # (model, processor, max_text_length), loaded by the first cell that runs
        self._eval_features = None

    def cell(self, k: int, seed: int, progress) -> dict:
        name = cell_name(k, seed)
        done = self.out / CELLS / f"{name}.json"
        if done.is_file():
            return json.loads(done.read_text())
        run_dir = self.out / RUNS / name
        if run_dir.exists():  # cut short earlier: start again from scratch
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True)
        zero_shot_path = self.out / ZERO_SHOT
        measure_zero_shot = not zero_shot_path.is_file()
        started = time.time()
        log_path = run_dir / CELL_LOG
        try:
            with log_path.open("w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                subset, probe = self.probe(k, seed)
                steps, batch = step_budget(subset["images"], self.cfg.train.batch_size)
                extra = cell_overrides(self.cfg, run_dir, k, seed, steps, batch, zero_shot=measure_zero_shot)
                self.train(load_config(self.recipe, [*self.overrides, *extra]))
        except BaseException:
            progress.write(f"cell k={k} seed={seed} stopped; what its run printed is in {log_path}", file=sys.stderr)
            raise
        results = json.loads((run_dir / EVAL / RESULTS_JSON).read_text())
        if measure_zero_shot:
            zero_shot = _classification(results, "zero_shot", self.eval_name)
            atomic_write_text(zero_shot_path, json.dumps({**zero_shot, "eval_set": self.eval_name, "measured_in": name}, indent=2) + "\n")
        shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)  # a finished cell never resumes; its adapter stays
        record = {
            "k": k,
            "seed": seed,
            **subset,
            "steps": steps,
            "batch_size": batch,
            "lora": _classification(results, "adapted", self.eval_name),
            "probe": probe,
            "seconds": round(time.time() - started, 1),
            "run_dir": str(run_dir),
        }
        done.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(done, json.dumps(record, indent=2) + "\n")
        progress.write(
            f"k={k} seed={seed}: LoRA top-1 {record['lora']['top1']:.1f}, probe {probe['top1']:.1f} "
            f"({steps} steps x {batch}, {record['seconds']:.0f} s)"
        )
        return record

    def probe(self, k: int, seed: int) -> tuple[dict, dict]:
        """The cell's k-shot subset (images, classes, short classes) and the linear probe fitted on it."""
        from data_tools.loading import RetrievalSet, load_image_text_dataset
        from finetune.config.specs import dataset_arguments
        from finetune.evaluation.baselines import linear_probe

        spec = self.cfg.data.train.model_copy(update={"shots_per_class": k, "shots_seed": seed})
        report: dict = {}
        pairs = load_image_text_dataset(key="data.train", report=report, **dataset_arguments(spec, seed))
        train_x, train_y = self.features(RetrievalSet.from_pairs(pairs), "data.train")
        if self._eval_features is None:
            eval_pairs = load_image_text_dataset(key=self.eval_key, **dataset_arguments(self.eval_spec, self.cfg.train.seed))
            self._eval_features = self.features(RetrievalSet.from_pairs(eval_pairs), self.eval_key)
        result = linear_probe(train_x, train_y, *self._eval_features, seed=seed)
        subset = {"images": len(train_y), "classes": len(set(train_y)), "short_classes": report.get("shots_short_classes", {})}
        probe = {"top1": result.top1, "macro_top1": result.macro_top1, "C": result.chosen["C"], "selected_on": result.chosen["selected_on"]}
        return subset, probe

    def features(self, rset, name: str):
        """(N, D) L2-normalised base-model image embeddings of a set's readable images, and their labels."""
        import torch.nn.functional as F

        from data_tools.pipeline import default_num_workers
        from finetune.evaluation.evaluate import embed_retrieval_set

        model, processor, max_text_length = self.base()
        workers = self.cfg.data.num_workers
        emb = embed_retrieval_set(
            model,
            processor,
            rset,
            batch_size=self.cfg.eval.batch_size,
            max_text_length=max_text_length,
            num_workers=default_num_workers(available_cores(), 1) if workers == "auto" else workers,
            name=name,
            desc=f"probe: {name}",
        )
        features = F.normalize(emb["image_emb"].float(), dim=-1).numpy()  # (N_valid, D)
        labels = [label for label, ok in zip(rset.labels, emb["image_valid"].tolist()) if ok]
        return features, labels

    def base(self):
        if self._base is None:
            import torch

            from finetune.config.specs import resolve_max_text_length
            from finetune.models.load import load_model, set_image_size

            m = self.cfg.model
            model, processor = load_model(m.name_or_path, m.revision, m.trust_remote_code)  # full precision, even for QLoRA
            set_image_size(processor, self.cfg.data.image_size)
            model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
            self._base = (model, processor, resolve_max_text_length(self.cfg))
        return self._base


def _classification(results: dict, row: str, eval_set: str) -> dict:
    scores = results[row][eval_set]["classification"]
    return {metric: scores[metric] for metric in METRICS}


# ----------------------------------------------------------------------------- the report


def _stats(values: Sequence[float]) -> dict:
    """mean, std (sample, ddof=1; 0 for one seed), min, max, n."""
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": len(a),
    }


def build_report(cells: list[dict], zero_shot: dict, *, recipe: str, overrides: list[str], eval_set: str, shots: Sequence[int]) -> dict:
    summary = []
    for k in shots:
        mine = [c for c in cells if c["k"] == k]
        row = {"k": k, "images": sorted({c["images"] for c in mine}), "steps": sorted({c["steps"] for c in mine})}
        row["batch_size"] = sorted({c["batch_size"] for c in mine})
        for metric in METRICS:
            row[f"probe_{metric}"] = _stats([c["probe"][metric] for c in mine])
            row[f"lora_{metric}"] = _stats([c["lora"][metric] for c in mine])
            row[f"lora_minus_probe_{metric}"] = _stats([c["lora"][metric] - c["probe"][metric] for c in mine])
        summary.append(row)
    report = {
        "recipe": recipe,
        "overrides": overrides,
        "eval_set": eval_set,
        "metric": f"classification top-1 and macro top-1 (%) on {eval_set}",
        "budget": {"rule": BUDGET_RULE, "epochs": SHOT_EPOCHS, "max_steps": MAX_STEPS},
        "zero_shot": {metric: zero_shot[metric] for metric in METRICS},
        "cells": cells,
        "summary": summary,
        "cell_seconds": round(sum(c["seconds"] for c in cells), 1),
        "machine": machine(),
    }
    report["table"] = format_table(report)
    return report


def _pm(stats: dict, signed: bool = False) -> str:
    return f"{stats['mean']:{'+' if signed else ''}.1f} ± {stats['std']:.1f}"


def format_table(report: dict, metric: str = "top1") -> str:
    """k | images | steps x batch | zero-shot | linear probe | LoRA | LoRA - probe (mean ± std over seeds)."""
    lines = [
        "| k | images | steps x batch | zero-shot | linear probe | LoRA | LoRA - probe |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["summary"]:
        budget = ", ".join(f"{s} x {b}" for s in row["steps"] for b in row["batch_size"])
        lines.append(
            f"| {row['k']} | {', '.join(map(str, row['images']))} | {budget} | {report['zero_shot'][metric]:.1f} | "
            f"{_pm(row[f'probe_{metric}'])} | {_pm(row[f'lora_{metric}'])} | {_pm(row[f'lora_minus_probe_{metric}'], signed=True)} |"
        )
    return "\n".join(lines)


def format_markdown(report: dict) -> str:
    seeds = max(row["lora_top1"]["n"] for row in report["summary"])
    short = sorted({f"{label} ({n})" for c in report["cells"] for label, n in c["short_classes"].items()})
    chosen = [c["probe"]["C"] for c in report["cells"]]
    lines = [
        f"# Few-shot study: {report['recipe']}",
        "",
        f"Classification on `{report['eval_set']}`, mean ± std (sample) over {seeds} seed(s) per k; "
        "k images per class drawn from data.train; zero-shot is the same for every cell.",
        f"LoRA budget: {report['budget']['rule']}, SHOT_EPOCHS={report['budget']['epochs']}, "
        f"MAX_STEPS={report['budget']['max_steps']}. "
        f"Linear probe: C chosen per cell on held-out training images where a class has two or more (C {min(chosen):.3g} to "
        f"{max(chosen):.3g}; shots.json has each cell's).",
        "",
        "## Top-1 (%)",
        "",
        format_table(report, "top1"),
        "",
        "## Macro top-1 (%)",
        "",
        format_table(report, "macro_top1"),
        "",
    ]
    if short:
        lines += [f"Classes with fewer than k images kept all of theirs: {', '.join(short)}.", ""]
    lines.append(f"Cells took {report['cell_seconds']:.0f} s on {report['machine']['cpu']} ({report['machine']['cores']} cores).")
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> dict[str, Path]:
    paths = {"json": out / "shots.json", "md": out / "shots.md", "png": out / "shots.png"}
    atomic_write_text(paths["json"], json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2) + "\n")
    atomic_write_text(paths["md"], format_markdown(report))
    with atomic_open(paths["png"]) as fh:
        save_plot(report, fh)
    return paths


def save_plot(report: dict, fh) -> None:
    """Top-1 against k (log2 axis): mean lines with min-max bands for the probe and LoRA, zero-shot dashed."""
    import matplotlib

    matplotlib.use("Agg")  # headless: training boxes have no display
    import matplotlib.pyplot as plt

    ks = [row["k"] for row in report["summary"]]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    try:
        for key, label, color in (("probe_top1", "linear probe", "#1f77b4"), ("lora_top1", "LoRA", "#d62728")):
            stats = [row[key] for row in report["summary"]]
            ax.plot(ks, [s["mean"] for s in stats], marker="o", color=color, label=f"{label} (mean, min-max band)")
            ax.fill_between(ks, [s["min"] for s in stats], [s["max"] for s in stats], color=color, alpha=0.18, linewidth=0)
        ax.axhline(report["zero_shot"]["top1"], color="#616161", linestyle="--", label="zero-shot")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks, [str(k) for k in ks])
        ax.minorticks_off()
        ax.set_xlabel("labelled images per class (k)")
        ax.set_ylabel(f"{report['eval_set']} classification top-1 (%)")
        ax.set_title(f"Few-shot: {Path(report['recipe']).name}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        fig.tight_layout()
        fig.savefig(fh, format="png", dpi=120)
    finally:
        plt.close(fig)
