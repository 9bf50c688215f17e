"""The model table: tower layouts come from the config class, and the one model interface (features,
logit scale, LoRA targets, per-tower counts) works on CLIP and on a CLIP-vision + XLM-R dual encoder."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    CLIPModel,
    CLIPVisionConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    XLMRobertaConfig,
)

from finetune.errors import LoraSetupError
from finetune.models.lora import (
    TowerLora,
    add_lora,
    lora_gradient_report,
    trainable_parameters_by_tower,
)
from finetune.models.towers import (
    image_features,
    logit_scale,
    model_layout,
    pair_features,
    text_features,
    unwrap,
)


def lora(rank: int, targets: tuple[str, ...]) -> TowerLora:
    return TowerLora(enabled=True, rank=rank, alpha=2.0 * rank, dropout=0.0, target_modules=targets, layers=None)


@pytest.fixture
def dual_encoder() -> VisionTextDualEncoderModel:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)
    text = XLMRobertaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    config = VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=16)
    return VisionTextDualEncoderModel(config)


def test_clip_layout_and_limit(tiny_clip_dir):
    model = CLIPModel.from_pretrained(tiny_clip_dir)
    layout = model_layout(model)
    assert layout.towers["vision"].layers == "vision_model.encoder.layers"
    assert layout.towers["text"].projection == "text_projection"
    assert layout.text_position_limit == model.config.text_config.max_position_embeddings == 32
    assert layout.tower_of("base_model.model.vision_model.encoder.layers.0.self_attn.q_proj.lora_A.default.weight") == "vision"
    assert layout.tower_of("module.text_projection.modules_to_save.default.weight") == "text"
    assert layout.tower_of("base_model.model.logit_scale") is None


def test_dual_encoder_layout_comes_from_each_towers_config_class(dual_encoder):
    layout = model_layout(dual_encoder)
    assert layout.architecture == "VisionTextDualEncoderConfig"
    assert layout.towers["vision"].layers == "vision_model.encoder.layers"  # CLIPVisionModel as a whole tower
    assert layout.towers["text"].layers == "text_model.encoder.layer"  # not encoder.layers
    assert layout.towers["text"].attention_modules == ("query", "key", "value", "attention.output.dense")
    assert len(dual_encoder.get_submodule(layout.towers["text"].layers)) == 3
    assert layout.text_position_limit == 40 - 1 - 1  # RoBERTa positions start after the padding index


def test_lora_on_a_dual_encoder_targets_xlmr_names_per_tower(dual_encoder):
    model = add_lora(
        dual_encoder,
        vision=lora(4, ("q_proj", "v_proj")),
        text=lora(2, ("query", "value")),
        train_projections=False,
        train_logit_scale=False,
    )
    wrapped = {n for n, _ in model.named_modules() if n.endswith(".lora_A.default")}
    text_sites = {n for n in wrapped if ".text_model." in n}
    vision_sites = {n for n in wrapped if ".vision_model." in n}
    assert len(text_sites) == 3 * 2 and len(vision_sites) == 2 * 2
    assert all(n.endswith(("attention.self.query.lora_A.default", "attention.self.value.lora_A.default")) for n in text_sites)
    counts = trainable_parameters_by_tower(model)
    # rank 2 on query/value of 3 text layers: (32*2 + 2*32) x 2 modules x 3 layers
    assert counts["text"]["trainable"] == (32 * 2 + 2 * 32) * 2 * 3
    assert counts["vision"]["trainable"] == (32 * 4 + 4 * 32) * 2 * 2
    assert counts["shared"]["trainable"] == 0 and counts["shared"]["total"] == 1  # the logit scale

    # Gradients reach both towers' adapters through the interface's features and logit scale.
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids = torch.randint(3, 100, (3, 7), generator=g)
    image, text = pair_features(model, pixels, ids, torch.ones_like(ids))
    assert image.shape == text.shape == (3, 16)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    (logit_scale(model).exp() * (image @ text.T)).diag().sum().backward()
    assert lora_gradient_report(model) == {"vision": True, "text": True}
    torch.testing.assert_close(image_features(model, pixels), unwrap(model).get_image_features(pixel_values=pixels).pooler_output)
    assert text_features(model, ids, torch.ones_like(ids)).shape == (3, 16)


def test_clip_module_names_on_xlmr_fail_with_the_names_that_exist(dual_encoder):
    with pytest.raises(
        LoraSetupError,
        match=r"lora\.text\.target_modules: \['q_proj'\] match no Linear layer in the text tower; available: .*attention\.self\.query",
    ):
        add_lora(dual_encoder, vision=lora(2, ("q_proj",)), text=lora(2, ("q_proj",)), train_projections=False, train_logit_scale=False)
