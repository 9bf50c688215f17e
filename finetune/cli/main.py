"""`domainclip`: one argparse tree, one module per command (`add_parser(sub)` + `run(args)`).

    domainclip train recipes/demo.yaml [key.sub=value ...] [--num-processes N]
    domainclip validate recipes/medical.yaml [key.sub=value ...]
    domainclip data inspect recipes/demo.yaml [key.sub=value ...] [--out DIR] [--decode]
    domainclip mine recipes/demo.yaml [key.sub=value ...] [--adapter RUN_DIR] [--out FILE]
    domainclip export RUN_DIR --out EXPORT_DIR [--alpha A | --alpha-sweep 0,0.5,1] [--dtype fp32|fp16|bf16|int8]
    domainclip index EXPORT_DIR --corpus SPEC --out INDEX_DIR [--modality image|text|both] [--memory-budget 2GB]
    domainclip search INDEX_DIR --text "..." | --image PATH [--text "..." --weight 0.5] [-k 10] [--json]
    domainclip serve INDEX_DIR [--host 127.0.0.1 --port 8000 --workers N --backend torch|onnx]
    domainclip push RUN_OR_EXPORT_DIR --repo user/name [--private] [--dry-run]
    domainclip study shots recipes/demo.yaml [key.sub=value ...] [--shots 1,2,4,8,16] [--seeds 3] [--out DIR]

Parsing imports nothing heavy: torch, transformers and faiss are imported by the command that runs, after
its arguments were checked, so `--help`, a typo or a missing folder answer at once. The toolkit's own
errors (finetune/errors.py) end a command with one line and exit 2 (3: a quality gate missed).
"""

from __future__ import annotations

import argparse
import sys

from finetune.cli import data, export, index, mine, push, search, serve, study, train, validate
from finetune.errors import DomainClipError

COMMANDS = (train, validate, data, mine, export, index, search, serve, push, study)  # the order of a project, then studies


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="domainclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # key.sub=value overrides may stand before or after the options: `train recipe --num-processes 2 a.b=1`.
    args, extra = parser.parse_known_args(argv)
    if extra and (not hasattr(args, "overrides") or any(e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        return args.run(args)
    except DomainClipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"\ninterrupted: domainclip {args.command} stopped before it finished", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
