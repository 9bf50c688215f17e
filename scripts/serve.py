"""`domainclip serve` as a script: python scripts/serve.py INDEX_DIR --help (see finetune/serve/command.py)."""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from finetune.serve.command import serve_main  # noqa: E402


def main(argv=None) -> int:
    return serve_main(argv)


if __name__ == "__main__":
    sys.exit(main())
