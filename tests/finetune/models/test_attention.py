"""Each tower's attention kernel: the `auto` rule, the token counts it reads, and that switching the kernel
changes neither the loss nor the LoRA gradients (CLIP and a dual encoder with a swapped text tower)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPVisionConfig

from finetune.config.schema import ModelConfig
from finetune.models.attention import (
    EAGER_MAX_TOKENS_CPU_BF16,
    choose_attention,
    set_attention,
    tower_tokens,
)
from finetune.models.load import load_model
from finetune.models.lora import TowerLora, add_lora
from finetune.models.text_swap import build_text_tower_swap
from finetune.models.towers import image_features, logit_scale, text_features
from finetune.training.losses import ClipInfoNCE, Features

SETTINGS = TowerLora(enabled=True, rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), layers=None)


def test_auto_picks_eager_only_for_short_sequences_on_a_cpu_in_bf16():
    vit_b32, vit_l14 = {"vision": 50, "text": 77}, {"vision": 257, "text": 77}
    assert choose_attention("auto", on_cpu=True, mixed_precision="bf16", tokens=vit_b32) == {"vision": "eager", "text": "eager"}
    assert choose_attention("auto", on_cpu=True, mixed_precision="bf16", tokens=vit_l14) == {"vision": "sdpa", "text": "eager"}
    edge = {"vision": EAGER_MAX_TOKENS_CPU_BF16, "text": EAGER_MAX_TOKENS_CPU_BF16 + 1}
    assert choose_attention("auto", on_cpu=True, mixed_precision="bf16", tokens=edge) == {"vision": "eager", "text": "sdpa"}
    for on_cpu, precision in ((True, "no"), (True, "fp16"), (False, "bf16"), (False, "no")):
        assert choose_attention("auto", on_cpu=on_cpu, mixed_precision=precision, tokens=vit_b32) == {"vision": "sdpa", "text": "sdpa"}
    assert choose_attention("eager", on_cpu=False, mixed_precision="no", tokens=vit_l14) == {"vision": "eager", "text": "eager"}
    assert choose_attention("sdpa", on_cpu=True, mixed_precision="bf16", tokens=vit_b32) == {"vision": "sdpa", "text": "sdpa"}


def test_tower_tokens_count_patches_plus_cls_at_the_training_resolution():
    class Config:
        vision_config = CLIPVisionConfig(image_size=224, patch_size=32)

    assert tower_tokens(Config(), image_size=None, max_text_length=77) == {"vision": 50, "text": 77}
    assert tower_tokens(Config(), image_size=320, max_text_length=32) == {"vision": 101, "text": 32}


def test_the_recipe_key_is_checked_by_the_schema():
    assert ModelConfig(name_or_path="x").attn_implementation == "auto"
    with pytest.raises(ValueError, match="attn_implementation"):
        ModelConfig(name_or_path="x", attn_implementation="flash")


def loss_and_lora_grads(model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    image = F.normalize(image_features(model, batch["pixel_values"]), dim=-1)  # (B, D)
    text = F.normalize(text_features(model, batch["input_ids"], batch["attention_mask"]), dim=-1)  # (B, D)
    loss = ClipInfoNCE()(Features(image=image, text=text, logit_scale=logit_scale(model)), {"image_index": torch.arange(4)})["contrastive"]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}


def tiny_batch(processor, captions) -> dict:
    tokens = processor.tokenizer(captions, padding=True, return_tensors="pt")  # padded: the mask matters
    g = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(4, 3, 32, 32, generator=g), **tokens}


CAPTIONS = ["a red circle", "two blue squares on a white background", "a green triangle", "an x-ray"]


def randomised_lora(model, text_targets: tuple[str, ...]):
    text = TowerLora(enabled=True, rank=4, alpha=8.0, dropout=0.0, target_modules=text_targets, layers=None)
    model = add_lora(model, vision=SETTINGS, text=text, train_projections=False, train_logit_scale=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:  # B starts at 0: give the adapters an effect on the outputs
                param.copy_(torch.randn(param.shape, generator=g) * 0.5)
    return model.train()


@pytest.mark.parametrize("base", ["clip", "swapped"])
def test_eager_and_sdpa_give_the_same_loss_and_lora_gradients(base, tiny_clip_dir, tiny_xlmr_dir):
    torch.manual_seed(0)
    if base == "clip":
        model, processor = load_model(str(tiny_clip_dir))
    else:
        model, processor = build_text_tower_swap(str(tiny_clip_dir), str(tiny_xlmr_dir))
    model = randomised_lora(model, ("q_proj", "v_proj") if base == "clip" else ("query", "value"))
    batch = tiny_batch(processor, CAPTIONS)
    set_attention(model, {"vision": "sdpa", "text": "sdpa"})
    loss_sdpa, grads_sdpa = loss_and_lora_grads(model, batch)
    set_attention(model, {"vision": "eager", "text": "eager"})
    inner = model.get_base_model()
    assert (inner.config.vision_config._attn_implementation, inner.config.text_config._attn_implementation) == ("eager", "eager")
    loss_eager, grads_eager = loss_and_lora_grads(model, batch)
    assert torch.allclose(loss_sdpa, loss_eager, atol=1e-5)
    assert set(grads_sdpa) == set(grads_eager) and any(g.abs().max() > 0 for g in grads_sdpa.values())
    for name in grads_sdpa:
        assert torch.allclose(grads_sdpa[name], grads_eager[name], atol=1e-5, rtol=1e-4), name
