"""Argument parsing for `domainclip export | index | search | push` (also scripts/export.py, index.py,
search.py, push.py). Each `*_main(argv)` parses, calls the package, prints one clear error line for the
toolkit's own errors and returns the exit status: 0 ok, 2 bad input, 3 a quality gate or recall target missed.
"""

from __future__ import annotations

import argparse
import json
import sys

from finetune.quiet import quiet_third_party_notices


def _toolkit_errors():
    from data_tools.loading import DataLoadError
    from finetune.config import ConfigError
    from finetune.export.merge import ExportError
    from finetune.model import ModelLoadError

    return (ConfigError, ModelLoadError, DataLoadError, ExportError)


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.25,0.5, got {text!r}") from None


def _run(fn) -> int:
    from finetune.export.quantize import QualityGateError

    quiet_third_party_notices()
    try:
        return fn()
    except QualityGateError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except _toolkit_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


# ----------------------------------------------------------------------------- export


def export_main(argv=None) -> int:
    from finetune.export.quantize import DTYPES

    parser = argparse.ArgumentParser(
        prog="domainclip export",
        description="Merge a run's LoRA adapters into its base (W = W0 + alpha * BA) and save a plain Hugging Face "
        "folder; optionally sweep alpha and quantize behind a quality gate.",
    )
    parser.add_argument("run_dir", help="a finished run folder (train.output_dir)")
    parser.add_argument("--out", required=True, help="export folder to write (replaced if it exists)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alpha", type=float, default=None, help="adapter scale (default: the recipe's export.alpha)")
    which.add_argument(
        "--alpha-sweep", nargs="?", const="", type=str, default=None,
        help="evaluate these alphas (comma-separated; bare flag: the recipe's export.alpha_sweep) and pick one by the export: rule",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32 | fp16 | bf16 | int8 (CPU, dynamic)")
    parser.add_argument(
        "--onnx", action="store_true",
        help="also write both towers as ONNX graphs into OUT/onnx/, checked against PyTorch on the target eval set",
    )
    parser.add_argument(
        "--onnx-int8", action="store_true",
        help="--onnx plus onnxruntime int8 (dynamic) copies of both towers, behind the R@1 quality gate",
    )
    args = parser.parse_args(argv)

    def go() -> int:
        from finetune.config import load_resolved_config
        from finetune.export.exporter import export_run, format_export_summary

        sweep = None
        if args.alpha_sweep is not None:
            sweep = _float_list(args.alpha_sweep) or load_resolved_config(f"{args.run_dir}/config.yaml").export.alpha_sweep
        manifest = export_run(
            args.run_dir, args.out, alpha=args.alpha, alpha_sweep=sweep, dtype=args.dtype, onnx=args.onnx, onnx_int8=args.onnx_int8
        )
        print(format_export_summary(manifest))
        q = manifest.get("quantization")
        if q:
            ratio = q["throughput_ratio_vs_fp32"]
            print(
                f"{args.dtype}: throughput vs fp32 x{ratio['images']:.2f} images, x{ratio['captions']:.2f} captions "
                f"(side by side, {q['threads']} threads); state {q['state_bytes'][args.dtype] / 1e6:.2f} MB vs "
                f"{q['state_bytes']['fp32'] / 1e6:.2f} MB fp32"
            )
        if "onnx" in manifest:
            from finetune.export.onnx import format_onnx_summary

            print(format_onnx_summary(manifest["onnx"]))
        return 0

    return _run(go)


# ----------------------------------------------------------------------------- index


def index_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="domainclip index",
        description="Embed a corpus with an export, build FAISS inner-product indexes sized to a memory budget, "
        "tune them to a recall target, write index + id map + manifest.",
    )
    parser.add_argument("export_dir")
    parser.add_argument(
        "--corpus", required=True,
        help="a dataset: a YAML/JSON mapping of the recipe's data.* keys (or a .yaml file holding one), "
        "a folder / hub id for load_dataset, or recipe:PATH[:data.eval.target]",
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--modality", choices=("image", "text", "both"), default="image")
    parser.add_argument("--memory-budget", default="2GB", help="for the index vectors, e.g. 512MB, 2GB")
    parser.add_argument("--target-recall", type=float, default=0.95, help="recall@10 vs exact search to tune for")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    args = parser.parse_args(argv)

    def go() -> int:
        from finetune.export.index import index_corpus, parse_bytes

        manifest = index_corpus(
            args.export_dir, args.corpus, args.out, modality=args.modality, memory_budget=parse_bytes(args.memory_budget),
            target_recall=args.target_recall, batch_size=args.batch_size, num_workers=args.num_workers,
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
        print(f"Index: {args.out}")
        return 0

    return _run(go)


# ----------------------------------------------------------------------------- search


def search_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="domainclip search",
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
        "--filter", action="append", default=[], metavar="FIELD=VALUE",
        help="keep hits whose id-map FIELD equals VALUE (e.g. label=circle); repeat a field for any of several values",
    )
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    args = parser.parse_args(argv)
    if args.text is None and args.image is None:
        parser.error("give --text, --image, or both")
    filters: dict[str, list[str]] = {}
    for item in args.filter:
        field, sep, value = item.partition("=")
        if not sep or not field:
            parser.error(f"--filter {item!r}: write FIELD=VALUE, e.g. --filter label=circle")
        filters.setdefault(field, []).append(value)

    def go() -> int:
        from finetune.export.search import Searcher, format_hits

        searcher = Searcher(args.index_dir)
        hits = searcher.search(text=args.text, image=args.image, weight=args.weight, k=args.k, against=args.against,
                               filters=filters or None)
        print(json.dumps(hits, indent=2) if args.json else format_hits(hits))
        return 0

    return _run(go)


# ----------------------------------------------------------------------------- push


def push_main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="domainclip push",
        description="Upload a run's adapter (or an export folder) with its processor, resolved recipe and a model card "
        "whose model-index holds zero-shot vs adapted metrics. The token comes from HF_TOKEN or `hf auth login`.",
    )
    parser.add_argument("path", help="a run folder or an export folder")
    parser.add_argument("--repo", required=True, help="user/name on the Hub")
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="write the folder and card that would be uploaded; upload nothing")
    parser.add_argument("--staging", default=None, help="where --dry-run writes the folder (default: PATH/hub-upload)")
    args = parser.parse_args(argv)

    def go() -> int:
        from finetune.export.push import push

        result = push(args.path, args.repo, private=args.private, dry_run=args.dry_run, staging=args.staging)
        print("\n".join(f"  {f}" for f in result["files"]))
        if args.dry_run:
            print(f"Dry run: {len(result['files'])} files for {args.repo} in {result['folder']} (nothing uploaded)")
        else:
            print(f"Uploaded {len(result['files'])} files to {result['url']}")
        return 0

    return _run(go)
