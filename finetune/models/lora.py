"""Load an image-text model, put PEFT LoRA adapters on each tower, check they really train, and load
an adapted run back for every later command.

Each tower gets its own rank, alpha, dropout, target modules and layer range. PEFT takes one
adapter per model, so the towers share one `LoraConfig` whose `rank_pattern` / `alpha_pattern`
carry the per-tower values; `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), adapter)`
then restores exactly what was trained. Where a tower's layers and projection live comes from the
model table in finetune/models/towers.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from finetune.errors import LoraSetupError
from finetune.models.towers import (
    TOWERS,
    image_features,
    model_layout,
    text_features,
    unwrap,
)


@dataclass(frozen=True)
class TowerLora:
    """Plain per-tower LoRA settings (a thin copy of the recipe's lora.<tower> section)."""

    enabled: bool
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...] | None


def tower_target_modules(model: nn.Module, tower: str, settings: TowerLora) -> list[str]:
    """Full names of the Linear modules LoRA should wrap in one tower.

    Raises with the available names when nothing matches: an adapter on nothing is the silent
    no-op we refuse to train.
    """
    layout = model_layout(model).towers[tower]
    layer_count = len(unwrap(model).get_submodule(layout.layers))
    if settings.layers is None:
        layers = set(range(layer_count))
    else:
        bad = [i for i in settings.layers if not -layer_count <= i < layer_count]
        if bad:
            raise LoraSetupError(
                f"lora.{tower}.layers: {bad} out of range for a {layer_count}-layer {tower} tower "
                f"(use 0..{layer_count - 1} or negative indices)"
            )
        layers = {i % layer_count for i in settings.layers}

    names, available = [], set()
    pattern = re.compile(re.escape(layout.layers + ".") + r"(\d+)\.(.+)$")
    for name, module in unwrap(model).named_modules():
        match = pattern.match(name)
        if not match or not isinstance(module, nn.Linear):
            continue
        available.add(match.group(2))
        if int(match.group(1)) in layers and any(match.group(2) == t or match.group(2).endswith("." + t) for t in settings.target_modules):
            names.append(name)
    if not names:
        raise LoraSetupError(
            f"lora.{tower}.target_modules: {list(settings.target_modules)} match no Linear layer in the {tower} "
            f"tower; available: {', '.join(sorted(available))}"
        )
    return names


def add_lora(
    model: nn.Module,
    vision: TowerLora,
    text: TowerLora,
    train_projections: bool,
    train_logit_scale: bool,
) -> PeftModel:
    """Wrap `model` with one PEFT LoRA adapter covering the enabled towers."""
    layout = model_layout(model)
    towers = {"vision": vision, "text": text}
    targets: dict[str, list[str]] = {t: tower_target_modules(model, t, s) for t, s in towers.items() if s.enabled}
    if not targets:
        raise LoraSetupError("lora.vision.enabled and lora.text.enabled are both false: nothing to adapt")

    first = towers[next(iter(targets))]
    rank_pattern, alpha_pattern = {}, {}
    for tower in targets:
        # Patterns are matched against full module names; anchoring on the tower prefix keeps them per tower.
        key = rf"{re.escape(layout.towers[tower].prefix)}\..*"
        rank_pattern[key] = towers[tower].rank
        alpha_pattern[key] = towers[tower].alpha
    config = LoraConfig(
        r=first.rank,
        lora_alpha=first.alpha,
        lora_dropout=first.dropout,
        # An exact-name list, so nothing outside the chosen towers/layers is ever touched.
        target_modules=[n for names in targets.values() for n in names],
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        modules_to_save=[layout.towers[t].projection for t in TOWERS] if train_projections else None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)

    # PEFT has one dropout per adapter; set each tower's own on its LoRA layers (training only).
    for tower, names in targets.items():
        p = towers[tower].dropout
        for name in names:
            layer = unwrap(peft_model).get_submodule(name)
            layer.lora_dropout["default"] = nn.Dropout(p) if p > 0 else nn.Identity()

    getattr(unwrap(peft_model), layout.logit_scale).requires_grad_(train_logit_scale)
    return peft_model


def trainable_parameters_by_tower(model: nn.Module) -> dict[str, dict[str, int]]:
    """{"vision"|"text"|"shared": {"trainable": n, "total": n}} for the log and the model card."""
    layout = model_layout(model)
    counts = {k: {"trainable": 0, "total": 0} for k in (*TOWERS, "shared")}
    for name, param in model.named_parameters():
        tower = layout.tower_of(name) or "shared"
        counts[tower]["total"] += param.numel()
        if param.requires_grad:
            counts[tower]["trainable"] += param.numel()
    return counts


def lora_gradient_report(model: nn.Module) -> dict[str, bool]:
    """Per tower: does any LoRA parameter hold a non-zero gradient? Call after the first backward."""
    layout = model_layout(model)
    seen: dict[str, bool] = {}
    for name, param in model.named_parameters():
        if "lora_" not in name or not param.requires_grad:  # PEFT's own parameter naming
            continue
        tower = layout.tower_of(name)
        has = param.grad is not None and bool(torch.any(param.grad != 0))
        seen[tower] = seen.get(tower, False) or has
    return seen


# The names the evaluation code calls; the model table decides how each architecture answers.
encode_images = image_features
encode_texts = text_features
