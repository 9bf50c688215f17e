"""Tests for finetune.models.lora: where LoRA lands, per-tower settings, that it trains, and that the
adapter round-trips through plain PEFT (and merges) without changing the embeddings."""

from __future__ import annotations

import re

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn
from transformers import CLIPModel

from finetune.config.schema import LoraTowerConfig
from finetune.errors import ModelLoadError
from finetune.models.adapter import extra_trainable_state
from finetune.models.load import load_model
from finetune.models.lora import (
    TowerLora,
    add_lora,
    encode_images,
    encode_texts,
    lora_gradient_report,
    trainable_parameters_by_tower,
)
from finetune.models.towers import logit_scale as logit_scale_of
from finetune.training.losses import ClipInfoNCE, Features


def lora(**settings) -> TowerLora:
    """Per-tower settings with the recipe schema's defaults for everything not given."""
    from finetune.train import tower_lora

    return tower_lora(LoraTowerConfig(**{k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}))


def adapt(model, vision: TowerLora, text: TowerLora, train_projections: bool = False, train_logit_scale: bool = False):
    return add_lora(model, vision=vision, text=text, train_projections=train_projections, train_logit_scale=train_logit_scale)


CAPTIONS = ["a red circle on a white background", "two blue squares", "a green triangle", "an x-ray of a chest"]
LORA_NAME = re.compile(r"(vision|text)_model\.encoder\.layers\.(\d+)\.(.+)\.lora_A\.default$")


@pytest.fixture
def clip(tiny_clip_dir):
    return load_model(str(tiny_clip_dir))


@pytest.fixture
def batch(clip):
    _, processor = clip
    g = torch.Generator().manual_seed(0)
    tokens = processor(text=CAPTIONS, padding=True, return_tensors="pt")
    return {
        "pixel_values": torch.randn(4, 3, 32, 32, generator=g),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
    }


def lora_sites(model: nn.Module) -> set[tuple[str, int, str]]:
    """(tower, layer, module path inside the layer) of every LoRA-wrapped Linear."""
    sites = set()
    for name, _ in model.named_modules():
        if (m := LORA_NAME.search(name)) is not None:
            sites.add((m.group(1), int(m.group(2)), m.group(3)))
    return sites


def lora_A_shapes(model: nn.Module, tower: str) -> set[tuple[int, ...]]:
    return {tuple(p.shape) for n, p in model.named_parameters() if f"{tower}_model." in n and ".lora_A." in n}


@torch.no_grad()
def features(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    return (
        encode_images(model, batch["pixel_values"]),
        encode_texts(model, batch["input_ids"], batch["attention_mask"]),
    )


@torch.no_grad()
def randomise_lora_B(model: nn.Module, seed: int = 1) -> None:
    """LoRA B starts at zero (a no-op adapter); give it values so the adapter changes the outputs."""
    g = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if ".lora_B." in name:
            param.copy_(torch.randn(param.shape, generator=g) * 0.5)


def contrastive_loss(model, batch) -> torch.Tensor:
    image = encode_images(model, batch["pixel_values"])
    text = encode_texts(model, batch["input_ids"], batch["attention_mask"])
    features = Features(image=F.normalize(image, dim=-1), text=F.normalize(text, dim=-1), logit_scale=logit_scale_of(model))
    return ClipInfoNCE()(features, {"image_index": torch.arange(4)})["contrastive"]


def assert_differs(a: torch.Tensor, b: torch.Tensor, min_gap: float = 1e-3) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() > min_gap


# --------------------------------------------------------------------------------------------------
# Where LoRA lands


def test_lora_wraps_exactly_the_requested_modules_and_layers(clip):
    model, _ = clip
    peft_model = adapt(
        model,
        vision=lora(rank=4, layers=(1,), target_modules=("q_proj", "v_proj")),
        text=lora(rank=2, layers=(-2,), target_modules=("out_proj", "fc1")),
    )
    assert lora_sites(peft_model) == {
        ("vision", 1, "self_attn.q_proj"),
        ("vision", 1, "self_attn.v_proj"),
        ("text", 0, "self_attn.out_proj"),
        ("text", 0, "mlp.fc1"),
    }
    # Per-tower rank: lora_A is (rank, in_features); fc1 and out_proj both take width 32 inputs.
    assert lora_A_shapes(peft_model, "vision") == {(4, 32)}
    assert lora_A_shapes(peft_model, "text") == {(2, 32)}


def test_default_layers_cover_every_layer_and_negative_index_is_the_last(clip):
    model, _ = clip
    peft_model = adapt(
        model,
        vision=lora(rank=4, layers=(-1,)),
        text=lora(rank=2, target_modules=("q_proj",)),
    )
    sites = lora_sites(peft_model)
    assert {s for s in sites if s[0] == "vision"} == {("vision", 1, f"self_attn.{m}") for m in ("q_proj", "k_proj", "v_proj", "out_proj")}
    assert {s for s in sites if s[0] == "text"} == {("text", 0, "self_attn.q_proj"), ("text", 1, "self_attn.q_proj")}


def test_trainable_parameter_counts_match_a_hand_count(clip):
    model, _ = clip
    total_before = sum(p.numel() for p in model.parameters())
    peft_model = adapt(
        model,
        vision=lora(rank=4, layers=(-1,)),
        text=lora(rank=2, target_modules=("q_proj",)),
    )
    counts = trainable_parameters_by_tower(peft_model)
    # vision: 4 Linear(32->32) in 1 layer, rank 4: A (4x32) + B (32x4) each.
    assert counts["vision"]["trainable"] == 4 * (4 * 32 + 32 * 4) == 1024
    # text: q_proj in 2 layers, rank 2.
    assert counts["text"]["trainable"] == 2 * (2 * 32 + 32 * 2) == 256
    assert counts["shared"] == {"trainable": 0, "total": 1}  # logit_scale, frozen
    assert sum(c["total"] for c in counts.values()) == total_before + 1024 + 256
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == 1280


def test_a_disabled_tower_gets_no_lora(clip):
    model, _ = clip
    peft_model = adapt(model, vision=lora(enabled=False, rank=4), text=lora(rank=3))
    sites = lora_sites(peft_model)
    assert sites and {s[0] for s in sites} == {"text"}
    assert lora_A_shapes(peft_model, "text") == {(3, 32)}
    counts = trainable_parameters_by_tower(peft_model)
    assert counts["vision"]["trainable"] == 0
    assert counts["text"]["trainable"] == 2 * 4 * (3 * 32 + 32 * 3)


def test_both_towers_disabled_is_an_error(clip):
    model, _ = clip
    with pytest.raises(ValueError, match=r"lora\.vision\.enabled and lora\.text\.enabled are both false"):
        adapt(model, vision=lora(enabled=False), text=lora(enabled=False))


def test_target_modules_matching_nothing_name_the_key_and_list_available(clip):
    model, _ = clip
    with pytest.raises(ValueError, match=r"lora\.text\.target_modules: \['query'\] match no Linear") as info:
        adapt(model, vision=lora(), text=lora(target_modules=("query",)))
    message = str(info.value)
    assert "available:" in message
    for name in ("self_attn.q_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"):
        assert name in message

    with pytest.raises(ValueError, match=r"lora\.vision\.target_modules: .*available: .*self_attn\.k_proj"):
        adapt(model, vision=lora(target_modules=("attn.qkv",)), text=lora())


@pytest.mark.parametrize("layers", [(2,), (0, -3)])
def test_out_of_range_layers_name_the_key(clip, layers):
    model, _ = clip
    with pytest.raises(ValueError, match=r"lora\.vision\.layers: \[-?\d\] out of range for a 2-layer vision tower"):
        adapt(model, vision=lora(layers=layers), text=lora())


def test_dropout_is_per_tower(clip):
    model, _ = clip
    peft_model = adapt(model, vision=lora(rank=4, dropout=0.0), text=lora(rank=2, dropout=0.25))
    dropouts = {name: module for name, module in peft_model.named_modules() if name.endswith("lora_dropout.default")}
    text = [m for n, m in dropouts.items() if "text_model." in n]
    vision = [m for n, m in dropouts.items() if "vision_model." in n]
    assert len(text) == len(vision) == 8  # 4 modules x 2 layers in each tower
    assert all(type(m) is nn.Dropout and m.p == 0.25 for m in text)
    assert all(type(m) is nn.Identity for m in vision)


def test_dropout_is_per_tower_when_vision_has_it(clip):
    model, _ = clip
    peft_model = adapt(model, vision=lora(dropout=0.1), text=lora(dropout=0.0))
    for name, module in peft_model.named_modules():
        if name.endswith("lora_dropout.default"):
            if "vision_model." in name:
                assert type(module) is nn.Dropout and module.p == 0.1
            else:
                assert type(module) is nn.Identity


# --------------------------------------------------------------------------------------------------
# Training


def test_one_step_trains_lora_in_both_towers_and_leaves_the_base_alone(clip, batch):
    model, _ = clip
    peft_model = adapt(model, vision=lora(rank=4), text=lora(rank=2))
    peft_model.train()
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)

    assert lora_gradient_report(peft_model) == {"vision": False, "text": False}  # no backward yet
    loss = contrastive_loss(peft_model, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert lora_gradient_report(peft_model) == {"vision": True, "text": True}
    optimizer.step()

    after = dict(peft_model.named_parameters())
    for tower in ("vision", "text"):
        changed = [n for n in before if f"{tower}_model." in n and ".lora_B." in n and not torch.equal(before[n], after[n].detach())]
        assert changed, f"no LoRA B weight of the {tower} tower moved"
    base = [n for n in before if "lora_" not in n]
    assert len(base) > 50
    for n in base:
        assert not after[n].requires_grad, n
        assert torch.equal(before[n], after[n].detach()), f"base weight {n} changed"


def test_logit_scale_trainable_only_when_asked(tiny_clip_dir):
    model, _ = load_model(str(tiny_clip_dir))
    frozen = adapt(model, vision=lora(), text=lora(), train_logit_scale=False)
    assert not frozen.base_model.model.logit_scale.requires_grad
    assert extra_trainable_state(frozen) == {}
    assert trainable_parameters_by_tower(frozen)["shared"]["trainable"] == 0

    model, _ = load_model(str(tiny_clip_dir))
    trained = adapt(model, vision=lora(), text=lora(), train_logit_scale=True)
    scale = trained.base_model.model.logit_scale
    assert scale.requires_grad
    with torch.no_grad():
        scale.fill_(3.25)
    extra = extra_trainable_state(trained)
    assert set(extra) == {"logit_scale"}
    assert extra["logit_scale"].item() == pytest.approx(3.25)
    assert not extra["logit_scale"].requires_grad
    # A copy, not a view: later training steps do not rewrite the saved value.
    with torch.no_grad():
        scale.fill_(1.0)
    assert extra["logit_scale"].item() == pytest.approx(3.25)
    assert trainable_parameters_by_tower(trained)["shared"]["trainable"] == 1


# --------------------------------------------------------------------------------------------------
# Save / load / merge


def test_adapter_round_trips_through_plain_peft(clip, batch, tiny_clip_dir, tmp_path):
    model, _ = clip
    peft_model = adapt(
        model,
        vision=lora(rank=4, alpha=8.0, layers=(-1,)),
        text=lora(rank=2, alpha=6.0, target_modules=("q_proj", "v_proj", "fc2")),
    )
    randomise_lora_B(peft_model)
    trained_img, trained_txt = features(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")

    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), tmp_path / "adapter")
    # Per-tower ranks survive the adapter_config round trip (fc2 takes the 64-wide MLP hidden state).
    assert lora_A_shapes(loaded, "vision") == {(4, 32)}
    assert lora_A_shapes(loaded, "text") == {(2, 32), (2, 64)}
    assert lora_sites(loaded) == lora_sites(peft_model)
    loaded_img, loaded_txt = features(loaded, batch)
    torch.testing.assert_close(loaded_img, trained_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded_txt, trained_txt, atol=1e-6, rtol=0)

    base_img, base_txt = features(CLIPModel.from_pretrained(tiny_clip_dir), batch)
    assert_differs(trained_img, base_img)
    assert_differs(trained_txt, base_txt)


def assert_plain_peft_round_trip(peft_model, batch, base_dir, tmp_path, **differs_kwargs):
    """save_pretrained -> PeftModel.from_pretrained(CLIPModel.from_pretrained(base)) gives the same
    features as the trained model, and those differ from the base model's (so this can fail)."""
    trained_img, trained_txt = features(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(CLIPModel.from_pretrained(base_dir), tmp_path / "adapter")
    loaded_img, loaded_txt = features(loaded, batch)
    torch.testing.assert_close(loaded_img, trained_img, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded_txt, trained_txt, atol=1e-6, rtol=0)
    base_img, base_txt = features(CLIPModel.from_pretrained(base_dir), batch)
    assert_differs(trained_img, base_img, **differs_kwargs)
    assert_differs(trained_txt, base_txt, **differs_kwargs)


def test_trained_adapter_after_optimizer_steps_round_trips(clip, batch, tiny_clip_dir, tmp_path):
    model, _ = clip
    peft_model = adapt(model, vision=lora(rank=4), text=lora(rank=2))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(2):
        contrastive_loss(peft_model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert_plain_peft_round_trip(peft_model, batch, tiny_clip_dir, tmp_path, min_gap=1e-4)


def test_trained_projections_are_restored_by_plain_peft(clip, batch, tiny_clip_dir, tmp_path):
    model, _ = clip
    peft_model = adapt(model, vision=lora(rank=4), text=lora(rank=2), train_projections=True)
    projection_params = [(n, p) for n, p in peft_model.named_parameters() if "projection" in n and p.requires_grad]
    assert {n.split(".")[2] for n, _ in projection_params} == {"visual_projection", "text_projection"}
    counts = trainable_parameters_by_tower(peft_model)
    # LoRA (all 4 attention Linears x 2 layers) + a 32x32 projection (no bias) per tower.
    assert counts["vision"]["trainable"] == 8 * (4 * 32 + 32 * 4) + 32 * 32
    assert counts["text"]["trainable"] == 8 * (2 * 32 + 32 * 2) + 32 * 32

    # Change only the projections (LoRA B stays zero): any difference from the base comes from them.
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in projection_params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    assert_plain_peft_round_trip(peft_model, batch, tiny_clip_dir, tmp_path)


def test_merge_and_unload_keeps_the_features(clip, batch):
    model, _ = clip
    peft_model = adapt(model, vision=lora(rank=4, alpha=4.0), text=lora(rank=2, alpha=8.0), train_projections=True)
    randomise_lora_B(peft_model, seed=5)
    adapted_img, adapted_txt = features(peft_model, batch)

    merged = peft_model.merge_and_unload()
    assert isinstance(merged, CLIPModel)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged_img, merged_txt = features(merged, batch)
    torch.testing.assert_close(merged_img, adapted_img, atol=5e-5, rtol=1e-5)  # float32 sums in another order
    torch.testing.assert_close(merged_txt, adapted_txt, atol=5e-5, rtol=1e-5)


def test_merge_changes_the_base_weights(clip, tiny_clip_dir):
    """The merge invariant above is only meaningful if the adapter is not a no-op."""
    model, _ = clip
    peft_model = adapt(model, vision=lora(rank=4), text=lora(rank=2))
    randomise_lora_B(peft_model, seed=5)
    merged = peft_model.merge_and_unload()
    base = CLIPModel.from_pretrained(tiny_clip_dir)
    for tower in ("vision_model", "text_model"):
        name = f"{tower}.encoder.layers.0.self_attn.q_proj.weight"
        assert_differs(merged.get_parameter(name).detach(), base.get_parameter(name).detach())
        name = f"{tower}.encoder.layers.0.mlp.fc1.weight"  # not a target: untouched
        assert torch.equal(merged.get_parameter(name), base.get_parameter(name))


# --------------------------------------------------------------------------------------------------
# Loading errors


def test_load_model_missing_folder_names_the_recipe_key(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    # Never reach for the network even if the path were taken for a hub id.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    missing = tmp_path / "no-such-model"
    with pytest.raises(
        ModelLoadError,
        match=r"^model\.name_or_path: could not load the model config from local folder|^model\.name_or_path: could not load the model config from hub id",
    ) as info:
        load_model(str(missing))
    assert str(missing) in str(info.value)
    assert "offline" not in str(info.value)  # HF_HUB_OFFLINE is not set in the environment
    assert info.value.__cause__ is not None


def test_load_model_offline_hub_id_says_the_machine_is_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE at import time; make the running process offline too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"model\.name_or_path: .*hub id 'nonexistent-org/nonexistent-model'") as info:
        load_model("nonexistent-org/nonexistent-model", revision="v1")
    message = str(info.value)
    assert "at revision 'v1'" in message
    assert "The machine is offline (HF_HUB_OFFLINE is set)" in message


def test_load_model_folder_without_a_model_is_a_local_folder_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"model\.name_or_path: .*from local folder") as info:
        load_model(str(tmp_path / "empty"))
    # A local folder is not a hub lookup: being offline is not the cause and is not blamed.
    assert "offline" not in str(info.value)


def test_a_folder_holding_weights_without_a_processor_names_both_classes(tiny_clip_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip_dir / name, folder / name)
    with pytest.raises(ModelLoadError, match=r"could not load CLIPModel \+ CLIPProcessor from local folder"):
        load_model(str(folder))


def test_a_checkpoint_that_is_not_an_image_text_model_is_refused_before_its_weights(tmp_path, monkeypatch):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64).save_pretrained(tmp_path)
    with pytest.raises(
        ModelLoadError,
        match=r"model\.name_or_path: a BertConfig checkpoint is not a supported image-text model; supported configs: CLIPConfig, VisionTextDualEncoderConfig",
    ):
        load_model(str(tmp_path))
