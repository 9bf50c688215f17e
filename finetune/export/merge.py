"""Merge a run's LoRA adapters into its base at a chosen scale, and save a plain Hugging Face folder.

Weight-space interpolation (WiSE-FT) done in adapter space: every LoRA layer becomes
W = W0 + alpha * (lora_alpha / r) * B A, so alpha = 0 is the base model and alpha = 1 the adapted
one. Fully trained projections (`model.train_projections`) and a trained logit scale are
interpolated the same way, W0 + alpha * (W1 - W0), so one alpha moves the whole model along the
line from base to adapted. The merged folder loads with plain `CLIPModel.from_pretrained`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from torch import nn

from finetune.errors import ExportError
from finetune.io import atomic_write_text
from finetune.models.load import save_processor
from finetune.models.towers import embedding_dim, model_layout
from finetune.runfolder import CONFIG, MANIFEST, WEIGHTS

FORMAT = "domainclip-export/1"


def merge_at_alpha(peft_model, alpha: float, *, base_logit_scale: torch.Tensor | None = None) -> nn.Module:
    """A merged copy of `peft_model` (left untouched) with every trained delta scaled by `alpha`.

    Args:
        peft_model: a PeftModel as `load_adapted` returns it.
        alpha: 0 reproduces the base, 1 the adapted model; values in between interpolate, above 1 extrapolate.
        base_logit_scale: the base checkpoint's logit scale, when the run trained it; None keeps the trained one
            unscaled (it does not change embeddings, only the temperature of logits).

    Returns:
        the plain transformers model (no PEFT wrapper), in eval mode.
    """
    if not alpha >= 0:
        raise ExportError(f"--alpha must be >= 0, got {alpha}")
    model = copy.deepcopy(peft_model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.scale_layer(alpha)  # scaling *= alpha on the active adapter
            elif isinstance(module, ModulesToSaveWrapper):
                original = module.original_module
                for trained in module.modules_to_save.values():
                    for w1, w0 in zip(trained.parameters(), original.parameters()):
                        w1.copy_(w0 + alpha * (w1 - w0))
        merged = model.merge_and_unload()
        if base_logit_scale is not None:
            name = model_layout(merged).logit_scale
            scale = getattr(merged, name)
            scale.copy_(base_logit_scale + alpha * (scale - base_logit_scale))
    for param in merged.parameters():
        param.requires_grad_(False)
    return merged.eval()


def load_run_for_export(run_dir: str | os.PathLike):
    """(peft model, processor, resolved config, base logit scale or None) of a finished run."""
    from finetune.config.load import load_resolved_config
    from finetune.models.adapter import load_adapted
    from finetune.models.load import load_model

    cfg = load_resolved_config(Path(run_dir) / CONFIG)
    model, processor = load_adapted(run_dir)
    base_scale = None
    if cfg.model.train_logit_scale:
        base, _ = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
        base_scale = getattr(base, model_layout(base).logit_scale).detach().clone()
        del base
    return model, processor, cfg, base_scale


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_export(model: nn.Module, processor, cfg, out_dir: str | os.PathLike, manifest: dict, *, extra_dirs: dict | None = None) -> Path:
    """Write model (safetensors) + processor + resolved recipe + manifest.json into `out_dir`.

    `extra_dirs` ({name: folder}) are moved into the export under `name` (the ONNX towers: `onnx/`).

    The folder is assembled under a temporary name beside `out_dir` and renamed into place, so an
    interrupted export never leaves a folder that looks complete. An existing `out_dir` is replaced.
    """
    from finetune.config.load import save_config

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)  # safetensors: transformers writes nothing else
    save_processor(processor, tmp)
    save_config(cfg, tmp / CONFIG)
    for name, folder in (extra_dirs or {}).items():
        shutil.move(str(folder), str(tmp / name))
    weights = tmp / WEIGHTS
    manifest = {
        **manifest,
        "weights": WEIGHTS,
        "weights_sha256": file_sha256(weights),
        "size_on_disk_bytes": weights.stat().st_size,
        "embedding_dim": embedding_dim(model),
    }
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if out.exists():
        old = out.parent / f".old-{out.name}"
        if old.exists():
            shutil.rmtree(old)
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)
    return out


def read_manifest(export_dir: str | os.PathLike) -> dict:
    path = Path(export_dir) / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: is {export_dir} a folder written by `domainclip export`?")
    return json.loads(path.read_text())


def load_export(export_dir: str | os.PathLike):
    """(model in eval mode, processor, manifest) of an export folder, in the dtype its manifest names."""
    from finetune.export.quantize import quantize_int8_dynamic
    from finetune.models.load import load_model

    manifest = read_manifest(export_dir)
    if manifest.get("format") != FORMAT:
        raise ExportError(f"{export_dir}/manifest.json: format {manifest.get('format')!r}, expected {FORMAT!r}")
    model, processor = load_model(str(export_dir))
    model.eval()
    if manifest["dtype"] == "int8":
        model = quantize_int8_dynamic(model)
    return model, processor, manifest
