"""Load an image-text model, put PEFT LoRA adapters on each tower, check they really train, and load
an adapted run back for every later command.

Each tower gets its own rank, alpha, dropout, target modules and layer range. PEFT takes one
adapter per model, so the towers share one `LoraConfig` whose `rank_pattern` / `alpha_pattern`
carry the per-tower values; `PeftModel.from_pretrained(CLIPModel.from_pretrained(base), adapter)`
then restores exactly what was trained. Where a tower's layers and projection live comes from the
model table in finetune/towers.py.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from data_tools.loading import offline_note
from finetune.towers import (
    TOWERS,
    UnsupportedModelError,
    architecture_for,
    image_features,
    model_layout,
    text_features,
    unwrap,
)

EXTRA_TRAINABLES_FILE = "extra_trainables.safetensors"


class ModelLoadError(RuntimeError):
    """The checkpoint could not be loaded; the message names the recipe key and what was tried."""


class LoraSetupError(ValueError):
    """The recipe's LoRA settings cannot be applied to this model (targets matching nothing, bad layers)."""


@dataclass(frozen=True)
class TowerLora:
    """Plain per-tower LoRA settings (a thin copy of the recipe's lora.<tower> section)."""

    enabled: bool
    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...] | None


def _describe(name_or_path: str, revision: str | None) -> str:
    kind = "local folder" if os.path.isdir(name_or_path) else "hub id"
    return f"{kind} {name_or_path!r}" + (f" at revision {revision!r}" if revision else "")


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """Only config.json: enough to check a recipe against the model before any weights are read."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # OSError, HF hub errors: the user needs the key and the cause
        raise ModelLoadError(
            f"model.name_or_path: could not load the model config from {_describe(name_or_path, revision)}: "
            f"{type(exc).__name__}: {exc}.{offline_note(name_or_path)}"
        ) from exc
    try:
        architecture_for(config)
    except UnsupportedModelError as exc:
        raise ModelLoadError(str(exc)) from None
    return config


def load_model(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, *,
    quantization_config=None, device=None,
):
    """`from_pretrained` for model and processor, classes chosen from the model table by config class.

    `quantization_config` (finetune.quantize) loads the base quantized onto `device` (QLoRA)."""
    config = load_model_config(name_or_path, revision, trust_remote_code)
    arch = architecture_for(config)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    quantized = {}
    if quantization_config is not None:
        quantized = dict(quantization_config=quantization_config, device_map={"": str(device or "cpu")})
    try:
        model = arch.model_class.from_pretrained(name_or_path, **kwargs, **quantized)
        processor = arch.processor_class.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"model.name_or_path: could not load {arch.model_class.__name__} + {arch.processor_class.__name__} "
            f"from {_describe(name_or_path, revision)}: {type(exc).__name__}: {exc}.{offline_note(name_or_path)}"
        ) from exc
    return model, processor


# PyTorch's fused attention (sdpa) on a CPU under bf16 autocast: its backward costs ~10 ms per layer call
# even for a few dozen tokens, where eager attention (two batched matmuls and a softmax) costs ~2 ms; the
# fused kernel pulls ahead from ~200-250 tokens (`attention_kernels` in scripts/benchmark.py: batch 8, 12
# heads of 64, forward + backward, eager vs sdpa: 4.1x faster at 50 tokens, 1.2x at 197, 0.71x at 257).
EAGER_MAX_TOKENS_CPU_BF16 = 200


def tower_tokens(config: PretrainedConfig, *, image_size: int | None, max_text_length: int) -> dict[str, int]:
    """Longest sequence each tower attends over: image patches + [CLS], and the caption token limit."""
    vision = config.vision_config
    side = (image_size or vision.image_size) // vision.patch_size
    return {"vision": side * side + 1, "text": max_text_length}


def choose_attention(requested: str, *, on_cpu: bool, mixed_precision: str, tokens: dict[str, int]) -> dict[str, str]:
    """Attention implementation per tower ("sdpa" or "eager"). `requested` auto: eager for a tower of at
    most EAGER_MAX_TOKENS_CPU_BF16 tokens when training on a CPU in bf16, sdpa everywhere else."""
    if requested != "auto":
        return {tower: requested for tower in tokens}
    cpu_bf16 = on_cpu and mixed_precision == "bf16"
    return {tower: "eager" if cpu_bf16 and n <= EAGER_MAX_TOKENS_CPU_BF16 else "sdpa" for tower, n in tokens.items()}


def set_attention(model: nn.Module, per_tower: dict[str, str]) -> None:
    """Switch each tower's attention kernel in place (same weights, same math)."""
    unwrap(model).set_attn_implementation({f"{tower}_config": impl for tower, impl in per_tower.items()})


def apply_attention(
    model: nn.Module, requested: str, *, on_cpu: bool, mixed_precision: str, image_size: int | None, max_text_length: int
) -> tuple[dict[str, str], dict[str, int]]:
    """Choose (`choose_attention`) and set each tower's kernel for a training run; returns (choice, tokens)."""
    tokens = tower_tokens(unwrap(model).config, image_size=image_size, max_text_length=max_text_length)
    attention = choose_attention(requested, on_cpu=on_cpu, mixed_precision=mixed_precision, tokens=tokens)
    set_attention(model, attention)
    return attention, tokens


def set_image_size(processor, image_size: int | None) -> None:
    """Resize + centre-crop to `image_size` pixels (data.image_size) instead of the checkpoint's size.

    The processor saved with the adapter keeps the size, so every later command uses it; the vision
    tower's position embeddings are interpolated to it (finetune/towers.py `resolution_kwargs`).
    """
    if image_size is None:
        return
    image_processor = processor.image_processor
    image_processor.size = {"shortest_edge": image_size}
    image_processor.crop_size = {"height": image_size, "width": image_size}


def save_processor(processor, out_dir) -> None:
    """processor_config.json plus preprocessor_config.json, which older loaders look for."""
    processor.save_pretrained(out_dir)
    processor.image_processor.save_pretrained(out_dir)


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
        if int(match.group(1)) in layers and any(
            match.group(2) == t or match.group(2).endswith("." + t) for t in settings.target_modules
        ):
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


def extra_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors PEFT's adapter file does not hold (the logit scale)."""
    name = model_layout(model).logit_scale
    scale = getattr(unwrap(model), name)
    return {name: scale.detach().clone()} if scale.requires_grad else {}


def save_adapter(model: nn.Module, processor, adapter_dir: str | os.PathLike) -> Path:
    """The adapter folder `load_adapted` reads: PEFT adapter, processor, and any extra trained tensors."""
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    model.save_pretrained(adapter_dir)
    save_processor(processor, adapter_dir)
    extra = extra_trainable_state(model)
    if extra:
        save_file({k: v.cpu() for k, v in extra.items()}, adapter_dir / EXTRA_TRAINABLES_FILE)
    return adapter_dir


def load_adapted(run_dir: str | os.PathLike, *, adapter_subdir: str = "adapter"):
    """(adapted model in eval mode, processor) of a finished run, for every command after training.

    The base checkpoint, revision and remote-code switch come from the run's resolved `config.yaml`;
    the adapter, processor and any extra trained tensors from `run_dir/adapter`.
    """
    from finetune.config import load_resolved_config

    run_dir = Path(run_dir)
    cfg = load_resolved_config(run_dir / "config.yaml")
    adapter = run_dir / adapter_subdir
    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"{adapter} holds no adapter_config.json: is {run_dir} a finished run folder?")
    if cfg.model.text_tower is not None:  # a swapped text tower: the run saved its (distilled) base model
        from finetune.distill import BASE_MODEL_DIR

        base, _ = load_model(str(run_dir / BASE_MODEL_DIR), None, cfg.model.trust_remote_code)
    else:  # always the full-precision base, also for a QLoRA run: merges and exports never go into quantized weights
        base, _ = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    if cfg.model.quantization != "none":
        print(f"{run_dir}: adapter trained on a {cfg.model.quantization} base; loaded onto the full-precision base")
    processor = architecture_for(base.config).processor_class.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    extra = adapter / EXTRA_TRAINABLES_FILE
    if extra.is_file():
        with torch.no_grad():
            for name, tensor in load_file(extra).items():
                getattr(unwrap(model), name).copy_(tensor)
    return model.eval(), processor


# The names the evaluation code calls; the model table decides how each architecture answers.
encode_images = image_features
encode_texts = text_features
