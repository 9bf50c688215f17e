"""Load an image-text checkpoint (config, weights, processor) and an adapted run back for every later command."""

from __future__ import annotations

import os

from transformers import AutoConfig, PretrainedConfig

from data_tools.hub import hub_or_cache, offline_note
from finetune.errors import ModelLoadError, UnsupportedModelError
from finetune.models.towers import architecture_for


def _describe(name_or_path: str, revision: str | None) -> str:
    kind = "local folder" if os.path.isdir(name_or_path) else "hub id"
    return f"{kind} {name_or_path!r}" + (f" at revision {revision!r}" if revision else "")


def load_model_config(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> PretrainedConfig:
    """Only config.json: enough to check a recipe against the model before any weights are read."""
    try:
        with hub_or_cache(name_or_path):
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
    name_or_path: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    *,
    quantization_config=None,
    device=None,
):
    """`from_pretrained` for model and processor, classes chosen from the model table by config class.

    `quantization_config` (finetune.models.qlora) loads the base quantized onto `device` (QLoRA)."""
    config = load_model_config(name_or_path, revision, trust_remote_code)
    arch = architecture_for(config)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    quantized = {}
    if quantization_config is not None:
        quantized = dict(quantization_config=quantization_config, device_map={"": str(device or "cpu")})
    try:
        with hub_or_cache(name_or_path):
            model = arch.model_class.from_pretrained(name_or_path, **kwargs, **quantized)
            processor = arch.processor_class.from_pretrained(name_or_path, **kwargs)
    except Exception as exc:
        raise ModelLoadError(
            f"model.name_or_path: could not load {arch.model_class.__name__} + {arch.processor_class.__name__} "
            f"from {_describe(name_or_path, revision)}: {type(exc).__name__}: {exc}.{offline_note(name_or_path)}"
        ) from exc
    return model, processor


def set_image_size(processor, image_size: int | None) -> None:
    """Resize + centre-crop to `image_size` pixels (data.image_size) instead of the checkpoint's size.

    The processor saved with the adapter keeps the size, so every later command uses it; the vision
    tower's position embeddings are interpolated to it (finetune/models/towers.py `resolution_kwargs`).
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
