"""`domainclip push` as a script: python scripts/push.py --help (the command lives in finetune/cli/push.py)."""

from __future__ import annotations

import sys

from finetune.cli.main import main as domainclip


def main(argv=None) -> int:
    return domainclip(["push", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
