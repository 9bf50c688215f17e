"""`domainclip export RUN_DIR --out EXPORT_DIR`: merge a run's adapters into its base at a chosen alpha, optionally
quantize behind a quality gate and write ONNX graphs."""

from __future__ import annotations

import argparse

from finetune.errors import ConfigError
from finetune.export import DTYPES


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers like 0,0.25,0.5, got {text!r}") from None


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "export",
        help="merge a run (alpha, dtype + quality gate) into a plain HF folder",
        description="Merge a run's LoRA adapters into its base (W = W0 + alpha * BA) and save a plain Hugging Face "
        "folder; optionally sweep alpha and quantize behind a quality gate.",
    )
    parser.add_argument("run_dir", help="a finished run folder (train.output_dir)")
    parser.add_argument("--out", required=True, help="export folder to write (replaced if it exists)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alpha", type=float, default=None, help="adapter scale (default: the recipe's export.alpha)")
    which.add_argument(
        "--alpha-sweep",
        nargs="?",
        const="",
        type=str,
        default=None,
        help="evaluate these alphas (comma-separated; bare flag: the recipe's export.alpha_sweep) and pick one by the export: rule",
    )
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="fp32 | fp16 | bf16 | int8 (CPU, dynamic)")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also write both towers as ONNX graphs into OUT/onnx/, checked against PyTorch on the target eval set",
    )
    parser.add_argument(
        "--onnx-int8",
        action="store_true",
        help="--onnx plus onnxruntime int8 (dynamic) copies of both towers, behind the R@1 quality gate",
    )
    parser.add_argument(
        "--allow-extrapolation",
        action="store_true",
        help="accept an alpha outside [0, 1] (past the adapted model, or below the base): untested territory",
    )
    parser.set_defaults(run=run)


def check_alphas(alphas: list[float], allow_extrapolation: bool) -> None:
    """alpha 0 is the base model, 1 the adapted one; outside [0, 1] only when asked for by name."""
    outside = [a for a in alphas if not 0 <= a <= 1]
    if outside and not allow_extrapolation:
        raise ConfigError(
            "--alpha",
            [
                f"alpha {', '.join(f'{a:g}' for a in outside)}: outside [0, 1] (0 = base, 1 = adapted); "
                "add --allow-extrapolation to export it anyway"
            ],
        )


def run(args) -> int:
    from finetune.config.load import load_resolved_config
    from finetune.export.exporter import export_run, format_export_summary

    sweep = None
    if args.alpha_sweep is not None:
        sweep = _float_list(args.alpha_sweep) or load_resolved_config(f"{args.run_dir}/config.yaml").export.alpha_sweep
    check_alphas([*([args.alpha] if args.alpha is not None else []), *(sweep or [])], args.allow_extrapolation)

    from finetune.quiet import quiet_third_party_notices

    quiet_third_party_notices()
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
