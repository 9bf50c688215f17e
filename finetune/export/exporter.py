"""`domainclip export`: run folder -> merged (optionally quantized) Hugging Face folder a service can load.

    run -> load adapted -> [alpha sweep: evaluate each alpha, pick by the recipe's export: rule]
        -> merge at alpha -> evaluate fp32 -> [quantize -> evaluate -> quality gate -> throughput side by side]
        -> [--onnx: both towers as ONNX graphs -> parity gate -> (--onnx-int8: onnxruntime int8 -> gate) -> throughput]
        -> EXPORT_DIR (model.safetensors, processor, config.yaml, manifest.json, eval/, onnx/)

`finetune.export.merge.load_export(EXPORT_DIR)` gives the model back as the manifest says (int8 quantized at load).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from finetune.errors import ExportError
from finetune.evaluation.report import format_results_table, write_results
from finetune.export.alpha import (
    alpha_name,
    choose_alpha,
    format_alpha_table,
    save_alpha_curve,
)
from finetune.export.merge import (
    FORMAT,
    load_run_for_export,
    merge_at_alpha,
    read_manifest,
    save_export,
)
from finetune.export.quantize import (
    embedding_throughput,
    quality_gate,
    quantize,
    state_bytes,
)
from finetune.io import atomic_write_text
from finetune.runfolder import ALPHA_SWEEP, EVAL, ZERO_SHOT

INT8_METHOD = "torch.ao.quantization.quantize_dynamic(nn.Linear, per-channel qint8), applied at load"


def load_eval_sets(cfg) -> dict:
    """The run's eval sets (target, and source when the recipe has one), as RetrievalSets.

    A run evaluated per language only (a swapped text tower) has no data.eval.target: its first
    language set stands in as the target the alpha rule and the quality gate read, and says so.
    """
    from data_tools.loading import RetrievalSet, load_image_text_dataset
    from finetune.config.specs import dataset_arguments, eval_specs

    named = eval_specs(cfg)  # target, source, then one per language code
    keys = {"target": "data.eval.target", "source": "data.eval.source"}
    if "target" not in named:
        languages = [name for name in named if name not in keys]
        if not languages:
            raise ExportError("the run's recipe has neither data.eval.target nor data.eval.languages: nothing to evaluate an export on")
        code = languages[0]
        keys["target"] = f"data.eval.languages.{code}"
        named["target"] = named[code]
        print(f"No data.eval.target in the run's recipe: export evaluates data.eval.languages.{code} as its target")
    return {
        name: RetrievalSet.from_pairs(load_image_text_dataset(key=keys[name], **dataset_arguments(named[name], cfg.train.seed)))
        for name in ("target", "source")
        if name in named
    }


def run_class_prompts(run_dir, cfg, eval_sets: dict) -> dict:
    """The class prompts the run was evaluated with (eval/class_prompts.json), so the quality gate classifies
    against the same texts; a run written before they were saved gets them rebuilt from the recipe and the
    eval sets' own captions."""
    from finetune.evaluation.prompts import FILE, load_class_prompts, prompts_for_sets

    saved = load_class_prompts(Path(run_dir) / EVAL / FILE)
    return saved if saved is not None else prompts_for_sets(cfg, eval_sets, None)


def text_limit(cfg, model) -> int:
    from finetune.models.towers import model_layout

    return cfg.data.max_text_length or model_layout(model).text_position_limit


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    alpha: float | None = None,
    alpha_sweep: list[float] | None = None,
    dtype: str = "fp32",
    onnx: bool = False,
    onnx_int8: bool = False,
    log=print,
) -> dict:
    """Export a finished run; returns the manifest. Raises ExportError / QualityGateError (nothing written).

    `onnx` adds the fp32 towers as ONNX graphs (finetune/export/onnx.py), `onnx_int8` also their
    onnxruntime int8 copies (implies `onnx`); both are exported from the fp32 merged model whatever `dtype` is.
    """
    from finetune.evaluation.evaluate import evaluate_retrieval

    if alpha is not None and alpha_sweep is not None:
        raise ExportError("give --alpha or --alpha-sweep, not both")
    started = time.perf_counter()
    peft_model, processor, cfg, base_scale = load_run_for_export(run_dir)
    ex = cfg.export
    eval_sets = load_eval_sets(cfg)
    max_len = text_limit(cfg, peft_model)
    prompts = run_class_prompts(run_dir, cfg, eval_sets)

    def evaluate(model, sets, desc):
        results, _ = evaluate_retrieval(
            model,
            processor,
            sets,
            batch_size=cfg.eval.batch_size,
            max_text_length=max_len,
            ks=tuple(cfg.eval.ks),
            desc=desc,
            class_prompts=prompts,
        )
        return results

    sweep = None
    if alpha_sweep is not None:
        alphas = sorted(set(float(a) for a in alpha_sweep))
        sweep_results = {}
        for a in alphas:
            sweep_results[alpha_name(a)] = evaluate(merge_at_alpha(peft_model, a, base_logit_scale=base_scale), eval_sets, alpha_name(a))
        choice = choose_alpha(
            sweep_results,
            alphas,
            direction=ex.select_direction,
            metric=ex.select_metric,
            min_source_retention=ex.min_source_retention,
            if_none=ex.if_no_alpha_qualifies,
        )
        alpha = choice.alpha
        sweep = dict(results=sweep_results, choice=choice)
        log(format_alpha_table(choice.rows, ex.select_direction, ex.select_metric))
        log(f"Chosen alpha={alpha:g}: {choice.reason}")
    elif alpha is None:
        alpha = ex.alpha

    merged = merge_at_alpha(peft_model, alpha, base_logit_scale=base_scale)
    fp32_results = sweep["results"][alpha_name(alpha)] if sweep else evaluate(merged, eval_sets, "merged fp32")
    results = {"fp32": fp32_results}
    manifest = {
        "format": FORMAT,
        "run_dir": str(Path(run_dir).resolve()),
        "base_model": cfg.model.name_or_path,
        "base_revision": cfg.model.revision,
        "alpha": alpha,
        "dtype": dtype,
        "architecture": type(merged.config).__name__,
        "max_text_length": max_len,
    }
    if sweep:
        manifest["alpha_rule"] = {
            "direction": ex.select_direction,
            "metric": ex.select_metric,
            "min_source_retention": ex.min_source_retention,
            "if_no_alpha_qualifies": ex.if_no_alpha_qualifies,
            "reason": sweep["choice"].reason,
            "rows": sweep["choice"].rows,
        }

    to_save = merged
    if dtype != "fp32":
        candidate = quantize(merged, dtype)
        results[dtype] = evaluate(candidate, {"target": eval_sets["target"]}, dtype)
        drops = quality_gate(fp32_results, results[dtype], dtype=dtype, max_r1_drop=ex.max_r1_drop)
        speed = measure_throughput({"fp32": merged, dtype: candidate}, processor, eval_sets["target"], max_len)
        manifest["quantization"] = {
            "method": INT8_METHOD if dtype == "int8" else f"weights cast to {dtype}",
            "max_r1_drop": ex.max_r1_drop,
            "r1_drop_points": drops,
            "r_at_k_delta_points": {
                d: {
                    m: float(results[dtype]["target"][d][m]) - float(fp32_results["target"][d][m])
                    for m in fp32_results["target"][d]
                    if m.startswith("R@")
                }
                for d in ("t2i", "i2t")
                if d in fp32_results["target"]
            },
            "throughput": speed,
            "throughput_ratio_vs_fp32": {
                "images": speed[dtype]["images_per_s"] / speed["fp32"]["images_per_s"],
                "captions": speed[dtype]["captions_per_s"] / speed["fp32"]["captions_per_s"],
            },
            "state_bytes": {"fp32": state_bytes(merged), dtype: state_bytes(candidate)},
            "threads": torch.get_num_threads(),
        }
        log(
            f"Quality gate passed: {dtype} vs fp32 target R@1 "
            + ", ".join(f"{d} {-v:+.2f}" for d, v in drops.items())
            + f" points (largest drop allowed: {ex.max_r1_drop})"
        )
        if dtype != "int8":
            to_save = candidate  # fp16 / bf16 are saved in their dtype; int8 is quantized at load
    extra_dirs = {}
    if onnx or onnx_int8:
        from finetune.export.onnx import ONNX_DIR, build_onnx, remove_tree

        staging = Path(out_dir).parent / f".onnx-{Path(out_dir).name}"
        remove_tree(staging)
        try:
            manifest["onnx"], onnx_results = build_onnx(
                merged,
                processor,
                eval_sets["target"],
                staging,
                max_text_length=max_len,
                batch_size=cfg.eval.batch_size,
                int8=onnx_int8,
                max_r1_drop=ex.max_r1_drop,
                ks=tuple(cfg.eval.ks),
                log=log,
            )
        except BaseException:
            remove_tree(staging)
            raise
        results.update(onnx_results)
        extra_dirs[ONNX_DIR] = staging
    manifest["results"] = results
    manifest["export_seconds"] = round(time.perf_counter() - started, 2)

    try:
        out = save_export(to_save, processor, cfg, out_dir, manifest, extra_dirs=extra_dirs)
    finally:  # moved into the export when it was saved; left behind only when saving failed
        for folder in extra_dirs.values():
            shutil.rmtree(folder, ignore_errors=True)
    write_export_reports(out, run_dir, results, sweep, ex)
    manifest = read_manifest(out)
    log(f"Export: {out}  ({manifest['size_on_disk_bytes'] / 1e6:.2f} MB model.safetensors, alpha={alpha:g}, {dtype})")
    return manifest


def write_export_reports(out: Path, run_dir, results: dict, sweep: dict | None, ex) -> None:
    """eval/ (zero-shot of the run, the merged fp32 model, the quantized one) and alpha_sweep/ when swept."""
    rows = {}
    zero_shot = Path(run_dir) / EVAL / ZERO_SHOT
    if zero_shot.is_file():
        rows["zero_shot"] = json.loads(zero_shot.read_text())
    rows.update(results)
    write_results(rows, out / EVAL, baseline="zero_shot" if "zero_shot" in rows else "fp32")
    if sweep:
        folder = out / ALPHA_SWEEP
        write_results(sweep["results"], folder, baseline=alpha_name(0.0))
        choice = sweep["choice"]
        atomic_write_text(
            folder / "alpha_table.md",
            format_alpha_table(choice.rows, ex.select_direction, ex.select_metric)
            + f"\n\nChosen alpha={choice.alpha:g}: {choice.reason}\n",
        )
        save_alpha_curve(
            choice.rows,
            choice.alpha,
            ex.select_direction,
            ex.select_metric,
            folder / "alpha_curve.png",
            min_source_retention=ex.min_source_retention,
        )


def measure_throughput(models: dict, processor, rset, max_len: int, n: int = 256) -> dict:
    """Embedding throughput of each model on the same batch of target images and captions, side by side."""
    from data_tools.collate import encode_captions, preprocess_images
    from data_tools.loading import decode_image

    images = [decode_image(rset.images[i]) for i in range(min(n, rset.num_images))]
    pixels = preprocess_images(processor, [im for im in images if im is not None])
    tokens = encode_captions(processor, rset.captions[:n], max_len)
    speed = embedding_throughput(models, pixels, tokens["input_ids"], tokens["attention_mask"])
    return {name: {k: round(v, 1) for k, v in row.items()} for name, row in speed.items()}


def format_export_summary(manifest: dict) -> str:
    """The results table of an export (fp32 and the quantized rows)."""
    return format_results_table(manifest["results"], baseline="fp32")
