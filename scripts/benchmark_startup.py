"""How fast `domainclip` answers before doing any work, as a ratio to `python -c "import torch"` measured
in the same run (goal: <= 0.5x each). Prints JSON.

    python scripts/benchmark_startup.py [--repeats 5]

Entries: `domainclip --help`; `domainclip validate` on a recipe with a misspelt key; `domainclip search`
on a missing index folder. Each is a fresh process; the commands and the torch import take turns in every
repeat (finetune/timing.py), and the fastest of the repeats is the cost of the code itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from finetune.timing import machine, side_by_side

ROOT = Path(__file__).resolve().parents[1]
GOAL = 0.5
COMMANDS = {
    "help": ["--help"],
    "validate_misspelt_key": ["validate", "recipes/demo.yaml", "lora.vison.rank=4"],
    "search_missing_index": ["search", "runs/no-such-index", "--text", "a red circle"],
}


def timed_process(argv: list[str], expect: int):
    def run() -> None:
        code = subprocess.run(argv, cwd=ROOT, capture_output=True).returncode
        if code != expect:
            raise RuntimeError(f"{' '.join(argv)} exited {code}, expected {expect}")

    return run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    cli = [sys.executable, "-m", "finetune.cli.main"]
    fns = {"import_torch": timed_process([sys.executable, "-c", "import torch"], 0)}
    for name, command in COMMANDS.items():
        fns[name] = timed_process([*cli, *command], 0 if name == "help" else 2)
    fastest = {name: min(times) for name, times in side_by_side(fns, repeats=args.repeats).items()}
    base = fastest["import_torch"]
    entries = {
        name: {
            "seconds": round(fastest[name], 3),
            "ratio_to_import_torch": round(fastest[name] / base, 3),
            "goal": f"<= {GOAL}x",
            "met": fastest[name] / base <= GOAL,
        }
        for name in COMMANDS
    }
    print(
        json.dumps(
            {
                "benchmark": "startup",
                "machine": machine(),
                "repeats": args.repeats,
                "import_torch_seconds": round(base, 3),
                "entries": entries,
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
