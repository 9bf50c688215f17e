"""`domainclip mine`: mine cross-modal hard negatives for data.train with the base model or a run's adapter."""

from __future__ import annotations

import time
from pathlib import Path

from finetune.errors import ConfigError


def add_parser(sub) -> None:
    parser = sub.add_parser("mine", help="mine cross-modal hard negatives for data.train", description=__doc__)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. mining.rank_max=32")
    parser.add_argument("--adapter", default=None, help="embed with this finished run's adapter instead of the base checkpoint")
    parser.add_argument(
        "--out",
        default=None,
        help="parquet file to write (default: <train.output_dir>/mining/negatives-step00000000.parquet "
        "for the base, <train.output_dir>/mining/negatives-adapter.parquet with --adapter)",
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    from finetune.config.load import load_config

    cfg = load_config(args.recipe, args.overrides)  # a recipe problem answers before anything heavy loads
    if cfg.model.text_tower is not None and args.adapter is None:
        raise ConfigError(
            args.recipe, ["model.text_tower: the swapped text tower is untrained before its run; mine with --adapter RUN_DIR"]
        )

    from finetune.quiet import quiet_third_party_notices

    quiet_third_party_notices()
    import torch

    from data_tools.loading import load_image_text_dataset
    from data_tools.mining import compose_batches, format_guard_counts, negatives_by_anchor
    from finetune.config.specs import dataset_arguments, resolve_max_text_length
    from finetune.models.adapter import load_adapted
    from finetune.models.load import load_model, set_image_size
    from finetune.training.data import build_sampler, build_training_set
    from finetune.training.mining import MINING_DIR, mine_training_set, mining_settings, negatives_name, summarize, write_negatives

    max_text_length = resolve_max_text_length(cfg)
    if args.adapter:
        model, processor = load_adapted(args.adapter)
    else:
        model, processor = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        set_image_size(processor, cfg.data.image_size)
    primary = load_image_text_dataset(key="data.train", **dataset_arguments(cfg.data.train, cfg.train.seed))
    primary_only = cfg.model_copy(update={"data": cfg.data.model_copy(update={"replay": []})})  # mining reads data.train alone
    train = build_training_set(primary_only, primary, [])
    settings = mining_settings(cfg)
    out = (
        Path(args.out)
        if args.out
        else Path(cfg.train.output_dir) / (negatives_name(0) if args.adapter is None else f"{MINING_DIR}/negatives-adapter.parquet")
    )
    started = time.time()
    result = mine_training_set(
        model,
        processor,
        train.pairs,
        train.num_primary,
        settings,
        batch_size=cfg.eval.batch_size,
        max_text_length=max_text_length,
        num_workers=0 if cfg.data.num_workers == "auto" else cfg.data.num_workers,
    )
    summary = summarize(
        result,
        settings,
        step=0 if args.adapter is None else None,
        model=args.adapter or f"base {cfg.model.name_or_path}",
        num_pairs=train.num_primary,
        seconds=time.time() - started,
    )
    base_sampler = build_sampler(primary_only, train)
    batch = cfg.train.batch_size
    base_order = torch.as_tensor(base_sampler.epoch_order(0, base_sampler.epoch_generator(0))).tolist()
    table = negatives_by_anchor(result.rows["anchor_row"], result.rows["negative_row"], result.rows["score"])
    order, stats = compose_batches(base_order, table, batch, cfg.mining.negatives_per_anchor_in_batch)
    summary["batch_sampler_epoch0"] = {
        "global_batch": batch,
        "negatives_per_anchor_in_batch": cfg.mining.negatives_per_anchor_in_batch,
        "anchors": stats.anchors,
        "anchors_with_negatives": stats.anchors_with_negatives,
        "negatives_wanted": stats.wanted,
        "negatives_in_batch": stats.placed,
        "coverage": round(stats.coverage(), 4),
        "deferred_anchors": stats.deferred,
        "epoch_rows": len(order),
    }
    write_negatives(result, out, summary)
    print(f"Mined data.train ({train.num_primary} pairs) with {summary['model']} in {summary['seconds']:.1f} s:\n")
    print(format_guard_counts(result.counts, result.mean_score))
    print(
        f"\nBatch sampler, epoch 0, global batch {batch} (1 process): {stats.placed} of {stats.wanted} wanted negatives "
        f"({100 * stats.coverage():.1f}%) share their anchor's batch; {stats.anchors_with_negatives} of {stats.anchors} anchors "
        f"had negatives; the epoch keeps its {len(order)} rows."
    )
    print(f"Wrote {out} ({len(result)} rows) and {out.with_suffix('.json')}")
    return 0
