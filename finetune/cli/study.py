"""`domainclip study shots RECIPE [key.sub=value ...] [--shots 1,2,4,8,16] [--seeds 3] [--out DIR]`: how much
labelled data adaptation needs, and whether LoRA beats a linear probe on the frozen base model.

For each k and seed: k images per class from data.train, a linear probe on the base model's image features
and the recipe's LoRA trained on them (a budget scaled to the subset), both scored by classification top-1
on the first eval set; zero-shot once. Cells finished are kept in OUT/cells and skipped when the same
command runs again, so an interrupted study resumes where it stopped (finetune/evaluation/shots.py).
"""

from __future__ import annotations

import shlex
import sys

from finetune.errors import ConfigError, TrainingInterrupted

DEFAULT_SHOTS = "1,2,4,8,16"


def add_parser(sub) -> None:
    study = sub.add_parser("study", help="measure what adaptation needs and buys on your data", description=__doc__)
    study_sub = study.add_subparsers(dest="study_command", required=True)
    shots = study_sub.add_parser(
        "shots",
        help="top-1 vs labelled images per class: zero-shot, linear probe, LoRA",
        description=__doc__,
    )
    shots.add_argument("recipe")
    shots.add_argument("overrides", nargs="*", help="key.sub=value overrides, applied to every cell")
    shots.add_argument("--shots", default=DEFAULT_SHOTS, help=f"images per class to try, comma-separated (default {DEFAULT_SHOTS})")
    shots.add_argument("--seeds", type=int, default=3, help="draws (and trainings) per k: seeds 0..N-1 (default 3)")
    shots.add_argument("--out", default=None, help="study folder (default: <train.output_dir>/study_shots)")
    shots.set_defaults(run=run)


def parse_shots(text: str) -> list[int]:
    """`1,2,4` -> [1, 2, 4] (sorted, without repeats); anything but positive integers is a ConfigError."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError("--shots", [f"--shots: comma-separated positive integers like {DEFAULT_SHOTS}, got {text!r}"])
    return sorted({int(p) for p in parts})


def run(args) -> int:
    from finetune.config.load import load_config

    shots = parse_shots(args.shots)
    if args.seeds < 1:
        raise ConfigError("--seeds", [f"--seeds: at least 1 seed per k, got {args.seeds}"])
    cfg = load_config(args.recipe, args.overrides)  # a recipe problem answers before anything heavy loads
    from finetune.evaluation.shots import run_shots_study, study_problems

    problems = study_problems(cfg)
    if problems:
        raise ConfigError(args.recipe, problems)

    from finetune.quiet import quiet_third_party_notices

    quiet_third_party_notices()
    from finetune.train import run as train_run

    out = args.out or f"{cfg.train.output_dir}/study_shots"
    try:
        report = run_shots_study(args.recipe, args.overrides, shots=shots, seeds=args.seeds, out=out, train=train_run)
    except (KeyboardInterrupt, TrainingInterrupted):
        command = ["domainclip", "study", "shots", args.recipe, *args.overrides, "--shots", ",".join(map(str, shots))]
        command += ["--seeds", str(args.seeds), "--out", out]
        print(
            f"\ninterrupted: finished cells are kept in {out}/cells; the same command resumes the study "
            f"(the interrupted cell starts again):\n  {shlex.join(command)}",
            file=sys.stderr,
        )
        return 130
    print(f"\nFew-shot study of {args.recipe} on {report['eval_set']}: classification top-1 (%), mean ± std over seeds\n")
    print(report["table"])
    print(f"\nWrote {out}/shots.json, {out}/shots.md, {out}/shots.png")
    return 0
