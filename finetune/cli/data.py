"""`domainclip data inspect RECIPE`: a report per dataset the recipe names (counts, classes, bad images,
duplicates, leakage), through the same recipe -> datasets resolver training uses."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="look at a recipe's datasets", description=__doc__)
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser("inspect", help="a report per dataset: counts, classes, bad images, duplicates, leakage")
    inspect.add_argument("recipe")
    inspect.add_argument("overrides", nargs="*")
    inspect.add_argument(
        "--out", default=None, help="folder for data_report.json and longtail.png (default: <train.output_dir>/data_report)"
    )
    inspect.add_argument("--decode", action="store_true", help="decode every image too (slower; finds damage a header check misses)")
    inspect.set_defaults(run=run)


def run(args) -> int:
    from finetune.config.load import load_config

    cfg = load_config(args.recipe, args.overrides)  # a recipe problem answers before anything heavy loads

    from finetune.quiet import quiet_third_party_notices

    quiet_third_party_notices()
    from transformers import AutoTokenizer

    from data_tools.inspect import format_report, inspect_datasets
    from finetune.config.specs import (
        dataset_arguments,
        dataset_specs,
        resolve_max_text_length,
    )
    from finetune.models.load import load_model_config
    from finetune.models.towers import architecture_for

    max_text_length = resolve_max_text_length(cfg)
    if cfg.model.text_tower is not None:  # captions go to the swapped text tower's own tokenizer
        tokenizer = AutoTokenizer.from_pretrained(cfg.model.text_tower, trust_remote_code=cfg.model.trust_remote_code)
    else:
        config = load_model_config(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        tokenizer = (
            architecture_for(config)
            .processor_class.from_pretrained(
                cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
            )
            .tokenizer
        )
    out_dir = Path(args.out) if args.out else Path(cfg.train.output_dir) / "data_report"
    reports = inspect_datasets(
        {key: dataset_arguments(spec, cfg.train.seed) for key, spec in dataset_specs(cfg).items()},
        tokenizer=tokenizer,
        max_text_length=max_text_length,
        out_dir=out_dir,
        decode=args.decode,
    )
    for key, report in reports.items():
        print(format_report(key, report))
    print(f"Wrote {out_dir / 'data_report.json'}, {out_dir / 'longtail.png'}")
    return 0
