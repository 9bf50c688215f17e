"""Swap CLIP's text tower for another encoder (e.g. XLM-R), keeping everything on the image side.

    model, processor = build_text_tower_swap("openai/clip-vit-base-patch32", "xlm-roberta-base")

The result is a `VisionTextDualEncoderModel`: CLIP's vision tower, CLIP's `visual_projection` and
temperature copied bit for bit, the new text encoder, and a new `text_projection` from the encoder's
width into CLIP's embedding space (random until trained). Image embeddings are exactly CLIP's, so an
image index built with the original model stays valid; only text has to learn to land in that space
(see finetune/training/distill.py). It saves and loads as a standard Hugging Face folder with its processor
(`VisionTextDualEncoderModel.from_pretrained` / `VisionTextDualEncoderProcessor.from_pretrained`).

Why `VisionTextDualEncoderModel` and not `AltCLIPModel`: the dual encoder takes any vision model and any
text encoder as whole Hugging Face models, so `xlm-roberta-base` loads unchanged and the toolkit's model
table already lays it out; AltCLIP fixes its own text model (a RoBERTa with an extra transformation
layer) and would need its weights converted from an XLM-R checkpoint. The text side pools with the
encoder's pooler (the first token's hidden state through a dense + tanh), as the dual encoder defines.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPProcessor,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

from data_tools.hub import hub_or_cache, offline_note
from finetune.errors import TextSwapError
from finetune.models.towers import TOWER_LAYERS, _lookup


def _from_pretrained(key: str, what: str, loader, name_or_path: str, **kwargs):
    try:
        with hub_or_cache(name_or_path):
            return loader(name_or_path, **kwargs)
    except Exception as exc:  # OSError, hub errors: the user needs the key and the cause
        kind = "local folder" if os.path.isdir(name_or_path) else "hub id"
        raise TextSwapError(
            f"{key}: could not load {what} from {kind} {name_or_path!r}: {type(exc).__name__}: {exc}.{offline_note(name_or_path)}"
        ) from exc


def text_swap_config(
    clip_name: str, text_name: str, revision: str | None = None, trust_remote_code: bool = False
) -> VisionTextDualEncoderConfig:
    """The dual encoder's config from the two config.json files alone (recipe checks before any weights)."""
    clip_config = _from_pretrained(
        "model.name_or_path",
        "a CLIP config",
        AutoConfig.from_pretrained,
        clip_name,
        revision=revision,
        trust_remote_code=trust_remote_code,
    )
    if not isinstance(clip_config, CLIPConfig):
        raise TextSwapError(
            f"model.name_or_path: model.text_tower swaps the text tower of a CLIP checkpoint; {clip_name!r} is a "
            f"{type(clip_config).__name__}"
        )
    text_config = _from_pretrained(
        "model.text_tower", "a text encoder config", AutoConfig.from_pretrained, text_name, trust_remote_code=trust_remote_code
    )
    if _lookup(TOWER_LAYERS, type(text_config)) is None:
        raise TextSwapError(
            f"model.text_tower: a {type(text_config).__name__} text encoder is not in the model table; supported: "
            + ", ".join(c.__name__ for c in TOWER_LAYERS)
        )
    return VisionTextDualEncoderConfig.from_vision_text_configs(
        clip_config.vision_config,
        text_config,
        projection_dim=clip_config.projection_dim,
        logit_scale_init_value=clip_config.logit_scale_init_value,
    )


def build_text_tower_swap(
    clip_name: str, text_name: str, revision: str | None = None, trust_remote_code: bool = False
) -> tuple[VisionTextDualEncoderModel, VisionTextDualEncoderProcessor]:
    """(dual encoder, processor): CLIP's image side copied exactly, `text_name` as the text tower.

    `revision` pins the CLIP checkpoint. The new `text_projection` is initialised by the dual encoder
    (seed torch first for a reproducible one).
    """
    config = text_swap_config(clip_name, text_name, revision, trust_remote_code)
    kwargs = dict(revision=revision, trust_remote_code=trust_remote_code)
    clip = _from_pretrained("model.name_or_path", "CLIPModel", CLIPModel.from_pretrained, clip_name, **kwargs)
    clip_processor = _from_pretrained("model.name_or_path", "CLIPProcessor", CLIPProcessor.from_pretrained, clip_name, **kwargs)
    text_model = _from_pretrained(
        "model.text_tower", "the text encoder", AutoModel.from_pretrained, text_name, trust_remote_code=trust_remote_code
    )
    tokenizer = _from_pretrained(
        "model.text_tower",
        "the text encoder's tokenizer",
        AutoTokenizer.from_pretrained,
        text_name,
        trust_remote_code=trust_remote_code,
    )
    if getattr(text_model, "pooler", True) is None:
        raise TextSwapError(f"model.text_tower: {text_name!r} loaded without a pooler; the dual encoder pools with it")

    model = VisionTextDualEncoderModel(config=config, text_model=text_model)
    with torch.no_grad():
        model.vision_model.load_state_dict(clip.vision_model.state_dict())
        model.visual_projection.weight.copy_(clip.visual_projection.weight)
        model.logit_scale.copy_(clip.logit_scale)
    processor = VisionTextDualEncoderProcessor(image_processor=clip_processor.image_processor, tokenizer=tokenizer)
    return model.eval(), processor
