"""`domainclip search` as a script: python scripts/search.py --help (see finetune/export/commands.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.export.commands import search_main  # noqa: E402


def main(argv=None) -> int:
    return search_main(argv)


if __name__ == "__main__":
    sys.exit(main())
