"""`domainclip push RUN_OR_EXPORT_DIR --repo user/name`: upload an adapter or export with its model card."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "push",
        help="upload a run or export with a model card (or --dry-run)",
        description="Upload a run's adapter (or an export folder) with its processor, resolved recipe and a model card "
        "whose model-index holds zero-shot vs adapted metrics. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("path", help="a run folder or an export folder")
    parser.add_argument("--repo", required=True, help="user/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="write the folder and card that would be uploaded; upload nothing")
    parser.add_argument("--staging", default=None, help="where --dry-run writes the folder (default: PATH/hub-upload)")
    parser.set_defaults(run=run)


def run(args) -> int:
    from finetune.export.push import push

    result = push(args.path, args.repo, private=args.private, dry_run=args.dry_run, staging=args.staging)
    print("\n".join(f"  {f}" for f in result["files"]))
    if args.dry_run:
        print(f"Dry run: {len(result['files'])} files for {args.repo} in {result['folder']} (nothing uploaded)")
    else:
        print(f"Uploaded {len(result['files'])} files to {result['url']}")
    return 0
