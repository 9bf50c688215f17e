"""`domainclip push`: a run's adapter (or an export folder) to the Hugging Face Hub, with a model card.

The folder that goes up is assembled first (`stage`): the adapter or export files, the processor, the
resolved recipe, the eval report, and a README.md whose YAML `model-index` holds zero-shot vs adapted
retrieval metrics (built with huggingface_hub's `ModelCardData` / `EvalResult`, parsed back before
anything leaves the machine). `--dry-run` stops there. Otherwise `HfApi.create_repo` + `upload_folder`.
The token is whatever huggingface_hub finds (HF_TOKEN, `hf auth login`); it is never printed.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData

from finetune.config.load import load_resolved_config
from finetune.config.schema import looks_like_local_path
from finetune.config.specs import eval_specs
from finetune.errors import ExportError
from finetune.models.load import load_model_config
from finetune.models.towers import architecture_for
from finetune.runfolder import ADAPTER, ADAPTER_CONFIG, BASE_MODEL_DIR, CONFIG, EVAL, MANIFEST, RESULTS_JSON, WEIGHTS

DRY_RUN_FOLDER = "hub-upload"  # --dry-run's default folder inside RUN_OR_EXPORT_DIR; never uploaded itself
DIRECTION_NAMES = {"t2i": "text-to-image retrieval", "i2t": "image-to-text retrieval"}


def _kind(path: Path) -> str:
    if (path / MANIFEST).is_file() and (path / WEIGHTS).is_file():
        return "export"
    if (path / ADAPTER / ADAPTER_CONFIG).is_file() and (path / CONFIG).is_file():
        return "run"
    raise ExportError(f"{path} is neither a run folder (adapter/ + config.yaml) nor an export folder (manifest.json)")


def _results(path: Path, kind: str) -> tuple[dict, str, str]:
    """(results rows, baseline row, adapted row) from the folder's eval/results.json."""
    results_file = path / EVAL / RESULTS_JSON
    if not results_file.is_file():
        raise ExportError(f"{results_file} not found: the card's metrics come from it")
    rows = json.loads(results_file.read_text())
    adapted = "adapted" if kind == "run" else "fp32"
    if "zero_shot" not in rows or adapted not in rows:
        raise ExportError(f"{results_file} needs rows zero_shot and {adapted}; it has {', '.join(rows)}")
    return rows, "zero_shot", adapted


def _dataset_of(cfg, eval_set: str) -> tuple[str, str, str | None]:
    """(dataset type, name, split) of a results row's eval set: target, source or a language code."""
    spec = eval_specs(cfg).get(eval_set)
    name = eval_set if eval_set in ("target", "source") else f"{eval_set} (data.eval.languages.{eval_set})"
    if spec is None:  # a results row the recipe no longer names: keep the metric, say what is known
        return eval_set, f"{name} eval set", None
    if spec.synthetic is not None:
        language = "" if eval_set in ("target", "source") else f"-{eval_set}"  # one model-index dataset per language
        return f"synthetic-{spec.synthetic.domain}{language}", f"{name} eval set (synthetic {spec.synthetic.domain} domain)", None
    return spec.path, f"{name} eval set ({spec.path})", spec.split


def build_card(path: Path, repo_id: str) -> ModelCard:
    kind = _kind(path)
    cfg = load_resolved_config(path / CONFIG)
    rows, baseline, adapted = _results(path, kind)
    labels = {baseline: "zero-shot", adapted: "adapted"}
    eval_results = []
    for row in (baseline, adapted):
        for eval_set, directions in rows[row].items():
            dataset_type, dataset_name, split = _dataset_of(cfg, eval_set)
            for direction, metrics in directions.items():
                for metric, value in metrics.items():
                    if not metric.startswith("R@"):
                        continue
                    eval_results.append(
                        EvalResult(
                            task_type=f"{direction}-retrieval",
                            task_name=DIRECTION_NAMES.get(direction, direction),
                            dataset_type=dataset_type,
                            dataset_name=dataset_name,
                            dataset_split=split,
                            metric_type=f"recall@{metric[2:]}",
                            metric_name=f"{labels[row]} {metric}",
                            metric_value=round(float(value), 2),
                        )
                    )
    data = ModelCardData(
        model_name=repo_id.split("/")[-1],
        # The Hub checks base_model against its repos: a local folder is named in the card's text only.
        base_model=None if looks_like_local_path(cfg.model.name_or_path) else cfg.model.name_or_path,
        library_name="peft" if kind == "run" else "transformers",
        tags=["clip", "domainclip", "lora", "image-text-retrieval"],
        pipeline_tag="zero-shot-image-classification",
        eval_results=eval_results,
    )
    table = (path / EVAL / "results.md").read_text() if (path / EVAL / "results.md").is_file() else ""
    if kind == "run" and cfg.model.text_tower is None:
        usage = (
            "```python\nfrom peft import PeftModel\nfrom transformers import CLIPModel, CLIPProcessor\n\n"
            f"model = PeftModel.from_pretrained(CLIPModel.from_pretrained({cfg.model.name_or_path!r}), {repo_id!r})\n"
            f"processor = CLIPProcessor.from_pretrained({repo_id!r})\n```"
        )
    elif kind == "run":  # the adapter sits on the run's swapped (and distilled) dual encoder, uploaded beside it
        usage = (
            "```python\nfrom peft import PeftModel\nfrom transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor\n\n"
            f"base = VisionTextDualEncoderModel.from_pretrained({repo_id!r}, subfolder={BASE_MODEL_DIR!r})\n"
            f"model = PeftModel.from_pretrained(base, {repo_id!r})\n"
            f"processor = VisionTextDualEncoderProcessor.from_pretrained({repo_id!r})\n```"
        )
    else:
        manifest = json.loads((path / MANIFEST).read_text())
        arch = architecture_for(load_model_config(str(path)))
        model_class, processor_class = arch.model_class.__name__, arch.processor_class.__name__
        usage = (
            f"LoRA merged at alpha={manifest['alpha']:g}, stored as {'fp32 (int8 applied at load)' if manifest['dtype'] == 'int8' else manifest['dtype']}.\n\n"
            f"```python\nfrom transformers import {model_class}, {processor_class}\n\n"
            f"model = {model_class}.from_pretrained({repo_id!r})\nprocessor = {processor_class}.from_pretrained({repo_id!r})\n```"
        )
    body = (
        f"# {repo_id.split('/')[-1]}\n\n{cfg.model.name_or_path} adapted with LoRA on both towers by domainclip.\n\n"
        f"## Use\n\n{usage}\n\n## Retrieval ({labels[baseline]} vs {labels[adapted]}, R@K in %)\n\n{table}\n"
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def stage(path: str | Path, repo_id: str, out: str | Path) -> list[str]:
    """Write the exact folder that would be uploaded into `out` (replaced); returns its files, relative."""
    path, out = Path(path), Path(out)
    kind = _kind(path)
    card = build_card(path, repo_id)
    ModelCardData(**card.data.to_dict(), ignore_metadata_errors=False)  # the model-index must parse back
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    if kind == "run":
        shutil.copytree(path / ADAPTER, out, dirs_exist_ok=True)
        shutil.copy2(path / CONFIG, out / CONFIG)
        if (path / BASE_MODEL_DIR).is_dir():  # a text-tower swap: the adapter cannot be used without it
            shutil.copytree(path / BASE_MODEL_DIR, out / BASE_MODEL_DIR)
    else:
        for item in path.iterdir():
            if item.name.startswith(".") or item.name == DRY_RUN_FOLDER or item.resolve() == out.resolve():
                continue
            (shutil.copytree if item.is_dir() else shutil.copy2)(item, out / item.name)
    if (path / EVAL).is_dir():
        shutil.copytree(path / EVAL, out / EVAL, dirs_exist_ok=True)
    card.save(out / "README.md")
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def push(path, repo_id: str, *, private: bool = False, dry_run: bool = False, staging=None, api: HfApi | None = None) -> dict:
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ExportError(f"--repo: expected user/name, got {repo_id!r}")
    if dry_run:
        folder = Path(staging) if staging else Path(path) / DRY_RUN_FOLDER
        files = stage(path, repo_id, folder)
        return {"folder": str(folder), "files": files, "url": None}
    with tempfile.TemporaryDirectory(prefix="domainclip-push-") as tmp:
        files = stage(path, repo_id, Path(tmp) / "upload")
        api = api or HfApi()  # token: HF_TOKEN or the cached login, resolved inside huggingface_hub
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(Path(tmp) / "upload"),
            repo_type="model",
            commit_message="Upload domainclip model",
        )
    return {"folder": None, "files": files, "url": str(url)}
