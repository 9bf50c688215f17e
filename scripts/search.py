"""`domainclip search` as a script: python scripts/search.py --help (the command lives in finetune/cli/search.py)."""

from __future__ import annotations

import sys

from finetune.cli.main import main as domainclip


def main(argv=None) -> int:
    return domainclip(["search", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
