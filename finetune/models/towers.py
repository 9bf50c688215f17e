"""The model table: where each supported architecture keeps its towers, and the one small interface the
rest of the toolkit uses to talk to a model.

Code never tests a model's name for substrings. It asks `model_layout(model)` (chosen from the class of
the checkpoint's config through `ARCHITECTURES`) for tower module paths, and calls `image_features`,
`text_features`, `pair_features` and `logit_scale`, which work the same on a plain model, a PEFT-wrapped
one and a DDP-wrapped one.

Two architectures are listed: `CLIPModel` and `VisionTextDualEncoderModel` (a vision tower plus any text
encoder, e.g. CLIP's vision tower with XLM-R). A dual encoder's towers are whole models of their own, so
where their encoder layers live is looked up by the tower's config class in `TOWER_LAYERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    PretrainedConfig,
    RobertaConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
    XLMRobertaConfig,
)

from finetune.errors import UnsupportedModelError

TOWERS = ("vision", "text")

CLIP_ATTENTION = ("q_proj", "k_proj", "v_proj", "out_proj")
BERT_ATTENTION = ("query", "key", "value", "attention.output.dense")


@dataclass(frozen=True)
class TowerLayout:
    """Module paths of one tower, relative to the (unwrapped) model."""

    prefix: str  # the tower's root module, e.g. "vision_model"
    layers: str  # the ModuleList of its encoder layers, e.g. "vision_model.encoder.layers"
    projection: str  # the Linear into the shared embedding space, e.g. "visual_projection"
    attention_modules: tuple[str, ...]  # attention Linears inside a layer: the usual LoRA targets

    def owns(self, parameter_name: str) -> bool:
        """Whether a parameter (by full name, under any wrapper prefix) belongs to this tower."""
        dotted = f".{parameter_name}."
        return f".{self.prefix}." in dotted or f".{self.projection}." in dotted


@dataclass(frozen=True)
class ModelLayout:
    architecture: str  # the config class, for messages
    towers: dict[str, TowerLayout]  # "vision", "text"
    logit_scale: str  # the parameter holding log(1 / temperature)
    text_position_limit: int  # longest caption, in tokens, the text tower can read

    def tower_of(self, parameter_name: str) -> str | None:
        for name, tower in self.towers.items():
            if tower.owns(parameter_name):
                return name
        return None


@dataclass(frozen=True)
class Architecture:
    model_class: type[nn.Module]
    processor_class: type
    layout: Callable[[PretrainedConfig], ModelLayout]


# Where the encoder layers sit inside a tower that is a whole model, by the tower's config class.
# (path of the layer ModuleList, attention Linears inside one layer, positions the tower can read)
TOWER_LAYERS: dict[type[PretrainedConfig], tuple[str, tuple[str, ...], Callable[[PretrainedConfig], int]]] = {
    CLIPVisionConfig: ("encoder.layers", CLIP_ATTENTION, lambda c: 0),
    CLIPTextConfig: ("encoder.layers", CLIP_ATTENTION, lambda c: c.max_position_embeddings),
    # RoBERTa-style position ids start after the padding index, so two positions are never usable.
    XLMRobertaConfig: ("encoder.layer", BERT_ATTENTION, lambda c: c.max_position_embeddings - c.pad_token_id - 1),
    RobertaConfig: ("encoder.layer", BERT_ATTENTION, lambda c: c.max_position_embeddings - c.pad_token_id - 1),
    BertConfig: ("encoder.layer", BERT_ATTENTION, lambda c: c.max_position_embeddings),
}


def _clip_layout(config: CLIPConfig) -> ModelLayout:
    return ModelLayout(
        architecture=type(config).__name__,
        towers={
            "vision": TowerLayout("vision_model", "vision_model.encoder.layers", "visual_projection", CLIP_ATTENTION),
            "text": TowerLayout("text_model", "text_model.encoder.layers", "text_projection", CLIP_ATTENTION),
        },
        logit_scale="logit_scale",
        text_position_limit=config.text_config.max_position_embeddings,
    )


def _tower_entry(config: PretrainedConfig, tower: str):
    entry = _lookup(TOWER_LAYERS, type(config))
    if entry is None:
        raise UnsupportedModelError(
            f"no layout for a {tower} tower with config {type(config).__name__}; supported: " + ", ".join(c.__name__ for c in TOWER_LAYERS)
        )
    return entry


def _dual_encoder_layout(config: VisionTextDualEncoderConfig) -> ModelLayout:
    vision_layers, vision_attention, _ = _tower_entry(config.vision_config, "vision")
    text_layers, text_attention, text_limit = _tower_entry(config.text_config, "text")
    return ModelLayout(
        architecture=type(config).__name__,
        towers={
            "vision": TowerLayout("vision_model", f"vision_model.{vision_layers}", "visual_projection", vision_attention),
            "text": TowerLayout("text_model", f"text_model.{text_layers}", "text_projection", text_attention),
        },
        logit_scale="logit_scale",
        text_position_limit=text_limit(config.text_config),
    )


ARCHITECTURES: dict[type[PretrainedConfig], Architecture] = {
    CLIPConfig: Architecture(CLIPModel, CLIPProcessor, _clip_layout),
    VisionTextDualEncoderConfig: Architecture(VisionTextDualEncoderModel, VisionTextDualEncoderProcessor, _dual_encoder_layout),
}


def _lookup(table: dict, cls: type):
    """Exact class first, then its bases (a subclass of CLIPConfig is laid out like CLIP)."""
    for klass in cls.__mro__:
        if klass in table:
            return table[klass]
    return None


def architecture_for(config: PretrainedConfig) -> Architecture:
    arch = _lookup(ARCHITECTURES, type(config))
    if arch is None:
        raise UnsupportedModelError(
            f"model.name_or_path: a {type(config).__name__} checkpoint is not a supported image-text model; "
            f"supported configs: {', '.join(c.__name__ for c in ARCHITECTURES)}"
        )
    return arch


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model under DDP (`.module`) and PEFT (`.get_base_model()`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def model_layout(model: nn.Module | PretrainedConfig) -> ModelLayout:
    config = model if isinstance(model, PretrainedConfig) else unwrap(model).config
    return architecture_for(config).layout(config)


def resolution_kwargs(model: nn.Module, pixel_values: torch.Tensor) -> dict:
    """`interpolate_pos_encoding=True` when images are not at the vision tower's native size (data.image_size).

    Only CLIPModel's forward takes the switch; another architecture at a foreign size fails in its own
    embedding layer, which names the size it expected.
    """
    base = unwrap(model)
    native = getattr(getattr(base.config, "vision_config", None), "image_size", None)
    if isinstance(base, CLIPModel) and native is not None and tuple(pixel_values.shape[-2:]) != (native, native):
        return {"interpolate_pos_encoding": True}
    return {}


def image_features(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Projected image embeddings, not normalised. # (B, D)"""
    return unwrap(model).get_image_features(pixel_values=pixel_values, **resolution_kwargs(model, pixel_values)).pooler_output


def text_features(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Projected caption embeddings, not normalised. # (B, D)"""
    return unwrap(model).get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def pair_features(
    model: nn.Module, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised (image, text) embeddings of a training batch, both (B, D).

    Goes through the outermost wrapper's forward, so DDP prepares its gradient reduction as it must;
    both architectures return `image_embeds` / `text_embeds` already normalised.
    """
    out = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask, **resolution_kwargs(model, pixel_values))
    return out.image_embeds, out.text_embeds


def logit_scale(model: nn.Module) -> nn.Parameter:
    """The learned log inverse temperature (a parameter: trainable or frozen as the recipe says)."""
    base = unwrap(model)
    return getattr(base, model_layout(base).logit_scale)


def embedding_dim(model: nn.Module) -> int:
    """Width D of the shared image-text embedding space (both architectures keep it in `projection_dim`)."""
    return int(unwrap(model).config.projection_dim)
