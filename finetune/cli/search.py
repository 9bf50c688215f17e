"""`domainclip search INDEX_DIR --text ... | --image PATH`: query an index; the fields are checked like the
service checks them (same messages), and a missing index folder is named before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import ExportError, ServeError
from finetune.retrieval.serve.limits import Limits, check_query


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "search",
        help="query an index by text, image or both",
        description="Query an index: --text (text->image), --image (image->image, image->text with --against text), "
        "or both with --weight (fused).",
    )
    parser.add_argument("index_dir")
    parser.add_argument("--text", default=None)
    parser.add_argument("--image", default=None, help="path of an image file")
    parser.add_argument("--weight", type=float, default=0.5, help="fused query: weight of the image embedding (0..1)")
    parser.add_argument("--against", choices=("image", "text"), default=None, help="which index (default: image when built)")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument(
        "--filter",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="keep hits whose id-map FIELD equals VALUE (e.g. label=circle); repeat a field for any of several values",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    parser.set_defaults(run=run)


def require_index_folder(index_dir: str) -> None:
    """A missing index folder, named before any model or index loads (`search` and `serve`)."""
    if not Path(index_dir).is_dir():
        raise ExportError(f"{index_dir}: no such index folder (write one with `domainclip index EXPORT_DIR --corpus ... --out DIR`)")


def parse_filters(items: list[str]) -> dict[str, list[str]]:
    filters: dict[str, list[str]] = {}
    for item in items:
        field, sep, value = item.partition("=")
        if not sep or not field:
            raise ServeError(422, "filters", f"--filter {item!r}: write FIELD=VALUE, e.g. --filter label=circle")
        filters.setdefault(field, []).append(value)
    return filters


def run(args) -> int:
    # The service's checks and messages, before anything loads.
    check_query(args.text, args.image is not None, args.k, args.weight, Limits())
    filters = parse_filters(args.filter)
    require_index_folder(args.index_dir)
    if args.image is not None and not Path(args.image).is_file():
        raise ExportError(f"--image: {args.image} does not exist")

    from finetune.quiet import quiet_third_party_notices
    from finetune.retrieval.search import Searcher, format_hits

    quiet_third_party_notices()
    searcher = Searcher(args.index_dir)
    hits = searcher.search(text=args.text, image=args.image, weight=args.weight, k=args.k, against=args.against, filters=filters or None)
    print(json.dumps(hits, indent=2) if args.json else format_hits(hits))
    return 0
