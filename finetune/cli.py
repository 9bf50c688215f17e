"""`domainclip` console script.

    domainclip train recipes/demo.yaml [key.sub=value ...]      same as finetune/train.py (one process)
    domainclip validate recipes/medical.yaml [key.sub=value ...] check a recipe, print the resolved config

For several GPUs or nodes use `accelerate launch finetune/train.py ...` (see the README).
"""

from __future__ import annotations

import argparse
import sys

import yaml

from finetune.config import ConfigError, load_config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="domainclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("train", "adapt a CLIP checkpoint with a recipe"), ("validate", "check a recipe without running it")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("recipe")
        cmd.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "train":
        from finetune.train import main as train_main

        return train_main([args.recipe, *args.overrides])
    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    print(f"# {args.recipe}: valid", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
