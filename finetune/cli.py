"""`domainclip` console script.

    domainclip train recipes/demo.yaml [key.sub=value ...]                    one process, in this process
    domainclip train recipes/medical.yaml --num-processes 8 [key.sub=value ...] hands off to Accelerate's launcher
    domainclip validate recipes/medical.yaml [key.sub=value ...]                check a recipe, print it resolved
    domainclip export RUN_DIR --out EXPORT_DIR [--alpha A | --alpha-sweep 0,0.5,1] [--dtype fp32|fp16|bf16|int8]
    domainclip index EXPORT_DIR --corpus SPEC --out INDEX_DIR [--modality image|text|both] [--memory-budget 2GB]
    domainclip search INDEX_DIR --text "..." | --image PATH [--text "..." --weight 0.5] [-k 10] [--json]
    domainclip push RUN_OR_EXPORT_DIR --repo user/name [--private] [--dry-run]
    domainclip serve INDEX_DIR [--host 127.0.0.1 --port 8000 --workers N --backend torch|onnx]   HTTP service
    domainclip data inspect recipes/demo.yaml [key.sub=value ...] [--out DIR] [--decode]   a data report
    domainclip mine recipes/demo.yaml [key.sub=value ...] [--adapter RUN_DIR] [--out FILE]  hard negatives + guard counts

`train` validates the recipe once, before any process starts, so a bad recipe gets one clean error. With
`--num-processes N` (N > 1) it runs `accelerate launch` with every launcher setting spelled out (on a
machine without CUDA, N CPU processes over gloo). Multi-node runs and custom Accelerate configs keep
using `accelerate launch finetune/train.py ...` directly.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

from finetune.config import ConfigError, load_config

TRAIN_SCRIPT = Path(__file__).resolve().parent / "train.py"


def launch_command(recipe: str, overrides: list[str], num_processes: int, mixed_precision: str, port: int | None = None) -> list[str]:
    """`accelerate launch` for N local processes with every setting it would otherwise warn about."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu",  # N processes: GPUs when CUDA is there, gloo CPU processes when not
        "--num_processes", str(num_processes),
        "--num_machines", "1",
        "--mixed_precision", mixed_precision,
        "--dynamo_backend", "no",
    ]
    if port is not None:
        command += ["--main_process_port", str(port)]
    return [*command, str(TRAIN_SCRIPT), recipe, *overrides]


def _export_commands() -> dict:
    from finetune.export import commands

    from finetune.serve.command import serve_main

    return {"export": commands.export_main, "index": commands.index_main, "search": commands.search_main, "push": commands.push_main,
            "serve": serve_main}


EXPORT_COMMANDS = ("export", "index", "search", "push", "serve")


def main(argv=None) -> int:
    from finetune.quiet import quiet_third_party_notices

    quiet_third_party_notices()  # every subcommand may import peft (and with it bitsandbytes' import-time notice)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in EXPORT_COMMANDS:  # each parses its own options (finetune/export/commands.py)
        return _export_commands()[argv[0]](argv[1:])
    if argv and argv[0] == "mine":  # finetune/mine.py parses its own options
        from finetune.mine import main as mine_main

        return mine_main(argv[1:])
    parser = argparse.ArgumentParser(prog="domainclip", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="adapt a checkpoint with a recipe")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*")
    train.add_argument("--num-processes", type=int, default=1, help="local processes (GPUs, or CPU processes without CUDA)")
    train.add_argument("--main-process-port", type=int, default=None, help="rendezvous port with --num-processes > 1")
    validate = sub.add_parser("validate", help="check a recipe without running it")
    validate.add_argument("recipe")
    validate.add_argument("overrides", nargs="*")
    for name, text in (("export", "merge a run (alpha, dtype + quality gate) into a plain HF folder"),
                       ("index", "embed a corpus with an export and build a tuned FAISS index"),
                       ("search", "query an index by text, image or both"),
                       ("push", "upload a run or export with a model card (or --dry-run)"),
                       ("serve", "HTTP service over an index: /search, /healthz, /info, /docs")):
        sub.add_parser(name, help=f"{text}; `domainclip {name} --help`", add_help=False)
    sub.add_parser("mine", help="mine cross-modal hard negatives for data.train; `domainclip mine --help`", add_help=False)
    data = sub.add_parser("data", help="look at a recipe's datasets")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    inspect = data_sub.add_parser("inspect", help="a report per dataset: counts, classes, bad images, duplicates, leakage")
    inspect.add_argument("recipe")
    inspect.add_argument("overrides", nargs="*")
    inspect.add_argument("--out", default=None, help="folder for data_report.json and longtail.png (default: <train.output_dir>/data_report)")
    inspect.add_argument("--decode", action="store_true", help="decode every image too (slower; finds damage a header check misses)")
    # Overrides may come before or after the options: `train recipe --num-processes 2 a.b=1` too.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]

    try:
        cfg = load_config(args.recipe, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.command == "data":
        return data_inspect(cfg, args.out, args.decode)
    if args.command == "validate":
        print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
        print(f"# {args.recipe}: valid", file=sys.stderr)
        return 0
    if args.num_processes < 1:
        print("error: --num-processes must be at least 1", file=sys.stderr)
        return 2
    if args.num_processes == 1:
        from finetune.train import main as train_main

        return train_main([args.recipe, *args.overrides])
    command = launch_command(args.recipe, args.overrides, args.num_processes, cfg.train.mixed_precision, args.main_process_port)
    return subprocess.run(command).returncode


def data_inspect(cfg, out: str | None, decode: bool) -> int:
    """`domainclip data inspect`: the recipe's datasets as plain loader arguments, then data_tools.inspect."""
    from data_tools.inspect import format_report, inspect_datasets
    from data_tools.loading import DataLoadError
    from finetune.model import ModelLoadError, load_model_config
    from finetune.towers import architecture_for, model_layout
    from finetune.train import dataset_arguments

    try:
        config = load_model_config(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        tokenizer = architecture_for(config).processor_class.from_pretrained(
            cfg.model.name_or_path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
        ).tokenizer
        specs = {"data.train": cfg.data.train, **{f"data.replay.{i}": r for i, r in enumerate(cfg.data.replay)},
                 "data.eval.target": cfg.data.eval.target}
        if cfg.data.eval.source is not None:
            specs["data.eval.source"] = cfg.data.eval.source
        out_dir = Path(out) if out else Path(cfg.train.output_dir) / "data_report"
        reports = inspect_datasets(
            {key: dataset_arguments(spec, cfg.train.seed) for key, spec in specs.items()}, tokenizer=tokenizer,
            max_text_length=cfg.data.max_text_length or model_layout(config).text_position_limit, out_dir=out_dir, decode=decode,
        )
    except (ModelLoadError, DataLoadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for key, report in reports.items():
        print(format_report(key, report))
    print(f"Wrote {out_dir / 'data_report.json'}, {out_dir / 'longtail.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
