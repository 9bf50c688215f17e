"""`domainclip train RECIPE [key.sub=value ...]`: in this process, or N processes through Accelerate's launcher.

The recipe is validated once, before any process starts, so a bad recipe gets one clean error. With
`--num-processes N` (N > 1) it runs `accelerate launch` with every launcher setting spelled out (on a
machine without CUDA, N CPU processes over gloo). Multi-node runs and custom Accelerate configs keep
using `accelerate launch finetune/train.py ...` directly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from finetune.errors import ConfigError

TRAIN_SCRIPT = Path(__file__).resolve().parent.parent / "train.py"


def add_parser(sub) -> None:
    parser = sub.add_parser("train", help="adapt a checkpoint with a recipe", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--num-processes", type=int, default=1, help="local processes (GPUs, or CPU processes without CUDA)")
    parser.add_argument("--main-process-port", type=int, default=None, help="rendezvous port with --num-processes > 1")
    parser.set_defaults(run=run)


def launch_command(recipe: str, overrides: list[str], num_processes: int, mixed_precision: str, port: int | None = None) -> list[str]:
    """`accelerate launch` for N local processes with every setting it would otherwise warn about."""
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",  # N processes: GPUs when CUDA is there, gloo CPU processes when not
        "--num_processes",
        str(num_processes),
        "--num_machines",
        "1",
        "--mixed_precision",
        mixed_precision,
        "--dynamo_backend",
        "no",
    ]
    if port is not None:
        command += ["--main_process_port", str(port)]
    return [*command, str(TRAIN_SCRIPT), recipe, *overrides]


def run(args) -> int:
    from finetune.config.load import load_config

    if args.num_processes < 1:
        raise ConfigError("--num-processes", [f"--num-processes must be at least 1, got {args.num_processes}"])
    cfg = load_config(args.recipe, args.overrides)
    if args.num_processes == 1:
        from finetune.train import main as train_main

        return train_main([args.recipe, *args.overrides])
    command = launch_command(args.recipe, args.overrides, args.num_processes, cfg.train.mixed_precision, args.main_process_port)
    return subprocess.run(command).returncode
