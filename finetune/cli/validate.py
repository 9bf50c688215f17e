"""`domainclip validate RECIPE [key.sub=value ...]`: check a recipe without running it; print it resolved."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    parser = sub.add_parser("validate", help="check a recipe without running it", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.set_defaults(run=run)


def run(args) -> int:
    import yaml

    from finetune.config.load import load_config

    cfg = load_config(args.recipe, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0
