"""`domainclip index EXPORT_DIR --corpus SPEC --out INDEX_DIR`: embed a corpus, build FAISS indexes sized to a
memory budget and tuned to a recall target; unreadable corpus images are skipped, counted and named."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "index",
        help="embed a corpus with an export and build a tuned FAISS index",
        description="Embed a corpus with an export, build FAISS inner-product indexes sized to a memory budget, "
        "tune them to a recall target, write index + id map + manifest.",
    )
    parser.add_argument("export_dir")
    parser.add_argument(
        "--corpus",
        required=True,
        help="a dataset: a YAML/JSON mapping of the recipe's data.* keys (or a .yaml file holding one), "
        "a folder / hub id for load_dataset, or recipe:PATH[:data.eval.target]",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--modality", choices=("image", "text", "both"), default="image")
    parser.add_argument("--memory-budget", default="2GB", help="for the index vectors, e.g. 512MB, 2GB")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 vs exact search to tune for")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.set_defaults(run=run)


def format_unreadable(manifest: dict, shown: int = 5) -> str | None:
    """One line naming the corpus images that could not be read (skipped, not indexed), or None."""
    count = manifest.get("corrupt_images", 0)
    if not count:
        return None
    names = manifest.get("unreadable_image_ids", [])[:shown]
    more = f", ... ({count - len(names)} more in manifest.json)" if count > len(names) else ""
    return f"Skipped {count} unreadable corpus image(s), not indexed: {', '.join(map(str, names))}{more}"


def run(args) -> int:
    from finetune.quiet import quiet_third_party_notices
    from finetune.retrieval.index import index_corpus, parse_bytes

    quiet_third_party_notices()

    manifest = index_corpus(
        args.export_dir,
        args.corpus,
        args.out,
        modality=args.modality,
        memory_budget=parse_bytes(args.memory_budget),
        target_recall=args.target_recall,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )
    if manifest is None:  # not the main process
        return 0
    for kind, entry in manifest["indexes"].items():
        print(
            f"{kind}: {entry['vectors']} vectors x {entry['dim']} -> {entry['factory']} {entry['search_params'] or ''} "
            f"recall@10 {entry['recall_at_10']:.3f} (target {entry['target_recall']}), "
            f"latency p50 {entry['latency_ms']['p50']:.3f} ms / p99 {entry['latency_ms']['p99']:.3f} ms at batch 1, "
            f"built in {entry['build_seconds']:.1f} s"
        )
    unreadable = format_unreadable(manifest)
    if unreadable:
        print(unreadable)
    print(f"Index: {args.out}")
    return 0
