"""Load CLIP, put PEFT LoRA adapters on each tower, and check they really train.

Each tower gets its own rank, alpha, dropout, target modules and layer range. PEFT takes one
adapter per model, so the towers share one `LoraConfig` whose `rank_pattern` / `alpha_pattern`
carry the per-tower values; `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), adapter)`
then restores exactly what was trained.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import CLIPModel, CLIPProcessor

from data_tools.loading import offline_note

# Where each tower lives inside transformers' CLIPModel.
TOWER_PREFIX = {"vision": "vision_model", "text": "text_model"}
TOWER_PROJECTION = {"vision": "visual_projection", "text": "text_projection"}


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message names the recipe key and what was tried."""


@dataclass(frozen=True)
class TowerLora:
    """Plain per-tower LoRA settings (a thin copy of the recipe's lora.<tower> section)."""

    enabled: bool = True
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    layers: tuple[int, ...] | None = None


def load_clip(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[CLIPModel, CLIPProcessor]:
    """`from_pretrained` for model and processor; failures name `model.name_or_path` and the offline state."""
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    try:
        model = CLIPModel.from_pretrained(name_or_path, **kwargs)
        processor = CLIPProcessor.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:  # OSError, HF hub errors, bad configs: the user needs the key and cause
        kind = "local folder" if os.path.isdir(name_or_path) else "hub id"
        raise ModelLoadError(
            f"model.name_or_path: could not load CLIPModel + CLIPProcessor from {kind} {name_or_path!r}"
            f"{f' at revision {revision!r}' if revision else ''}: {type(exc).__name__}: {exc}.{offline_note()}"
        ) from exc
    return model, processor


def save_processor(processor: CLIPProcessor, out_dir) -> None:
    """processor_config.json plus preprocessor_config.json, which older loaders look for."""
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)


def tower_target_modules(model: CLIPModel, tower: str, settings: TowerLora) -> list[str]:
    """Full names of the Linear modules LoRA should wrap in one tower.

    Raises with the available names when nothing matches: an adapter on nothing is the silent
    no-op we refuse to train.
    """
    prefix = f"{TOWER_PREFIX[tower]}.encoder.layers."
    layer_count = getattr(model.config, f"{tower}_config").num_hidden_layers
    if settings.layers is None:
        layers = set(range(layer_count))
    else:
        bad = [i for i in settings.layers if not -layer_count <= i < layer_count]
        if bad:
            raise ValueError(
                f"lora.{tower}.layers: {bad} out of range for a {layer_count}-layer {tower} tower "
                f"(use 0..{layer_count - 1} or negative indices)"
            )
        layers = {i % layer_count for i in settings.layers}

    names, available = [], set()
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
    for name, module in model.named_modules():
        match = pattern.match(name)
        if not match or not isinstance(module, nn.Linear):
            continue
        available.add(match.group(2))
        if int(match.group(1)) in layers and any(
            match.group(2) == t or match.group(2).endswith("." + t) for t in settings.target_modules
        ):
            names.append(name)
    if not names:
        raise ValueError(
            f"lora.{tower}.target_modules: {list(settings.target_modules)} match no Linear layer in the {tower} "
            f"tower; available: {', '.join(sorted(available))}"
        )
    return names


def add_lora(
    model: CLIPModel,
    vision: TowerLora,
    text: TowerLora,
    train_projections: bool = False,
    train_logit_scale: bool = False,
) -> PeftModel:
    """Wrap `model` with one PEFT LoRA adapter covering the enabled towers."""
    towers = {"vision": vision, "text": text}
    targets: dict[str, list[str]] = {t: tower_target_modules(model, t, s) for t, s in towers.items() if s.enabled}
    if not targets:
        raise ValueError("lora.vision.enabled and lora.text.enabled are both false: nothing to adapt")

    first = towers[next(iter(targets))]
    rank_pattern, alpha_pattern = {}, {}
    for tower, names in targets.items():
        # Patterns are matched against full module names; anchoring on the tower prefix keeps them per tower.
        key = rf"{TOWER_PREFIX[tower]}\..*"
        rank_pattern[key] = towers[tower].rank
        alpha_pattern[key] = towers[tower].alpha
    all_targets = [n for names in targets.values() for n in names]
    config = LoraConfig(
        r=first.rank,
        lora_alpha=first.alpha,
        lora_dropout=first.dropout,
        # An exact-name list, so nothing outside the chosen towers/layers is ever touched.
        target_modules=all_targets,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=list(TOWER_PROJECTION.values()) if train_projections else None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)

    # PEFT has one dropout per adapter; set each tower's own on its LoRA layers (training only).
    for tower, names in targets.items():
        p = towers[tower].dropout
        for name in names:
            layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_dropout["default"] = nn.Dropout(p) if p > 0 else nn.Identity()

    base = peft_model.base_model.model
    base.logit_scale.requires_grad_(train_logit_scale)
    return peft_model


def trainable_parameters_by_tower(model: nn.Module) -> dict[str, dict[str, int]]:
    """{"vision"|"text"|"shared": {"trainable": n, "total": n}} for the log and the model card."""
    counts = {k: {"trainable": 0, "total": 0} for k in ("vision", "text", "shared")}
    for name, param in model.named_parameters():
        tower = "shared"
        for t in ("vision", "text"):
            if TOWER_PREFIX[t] in name or TOWER_PROJECTION[t] in name:
                tower = t
        counts[tower]["total"] += param.numel()
        if param.requires_grad:
            counts[tower]["trainable"] += param.numel()
    return counts


def lora_gradient_report(model: nn.Module) -> dict[str, bool]:
    """Per tower: does any LoRA parameter hold a non-zero gradient? Call after the first backward."""
    seen: dict[str, bool] = {}
    for name, param in model.named_parameters():
        if "lora_" not in name or not param.requires_grad:
            continue
        tower = "vision" if TOWER_PREFIX["vision"] in name else "text"
        has = param.grad is not None and bool(torch.any(param.grad != 0))
        seen[tower] = seen.get(tower, False) or has
    return seen


def extra_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors PEFT's adapter file does not hold (the logit scale)."""
    base = model.base_model.model if isinstance(model, PeftModel) else model
    return {"logit_scale": base.logit_scale.detach().clone()} if base.logit_scale.requires_grad else {}


def encode_images(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image features, not normalised. # (B, D)"""
    return model.get_image_features(pixel_values=pixel_values).pooler_output


def encode_texts(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected text features, not normalised. # (B, D)"""
    return model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
