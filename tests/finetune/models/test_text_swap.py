"""CLIP with its text tower swapped for XLM-R: the image side is CLIP's bit for bit, the folder round-trips,
and stage 1 (distillation) moves only the text side towards the teacher."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, CLIPProcessor, VisionTextDualEncoderModel

from data_tools.synthetic.multilingual import parallel_text_rows
from finetune.errors import TextSwapError
from finetune.evaluation.report import format_language_table
from finetune.models.load import load_model
from finetune.models.lora import TowerLora
from finetune.models.text_swap import build_text_tower_swap, text_swap_config
from finetune.models.towers import image_features, model_layout, text_features
from finetune.training.distill import (
    DistillationLoss,
    DistillSettings,
    ParallelTextCollator,
    distill_text_tower,
    save_base_model,
)


@pytest.fixture
def swapped(tiny_clip_dir, tiny_xlmr_dir):
    torch.manual_seed(0)
    return build_text_tower_swap(str(tiny_clip_dir), str(tiny_xlmr_dir))


def test_swap_keeps_clips_image_side_exactly(swapped, tiny_clip_dir, tmp_path):
    model, processor = swapped
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    pixels = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert torch.equal(image_features(model, pixels), image_features(clip, pixels))
    assert torch.equal(model.logit_scale, clip.logit_scale)
    assert model.config.projection_dim == clip.config.projection_dim
    layout = model_layout(model)
    assert layout.towers["text"].attention_modules == ("query", "key", "value", "attention.output.dense")
    assert layout.text_position_limit == 40

    # A standard HF folder: the toolkit's loader picks the dual encoder and its processor from the config class.
    save_base_model(model, processor, tmp_path)
    loaded, loaded_processor = load_model(str(tmp_path / "base_model"))
    assert type(loaded) is VisionTextDualEncoderModel and type(loaded_processor.tokenizer).__name__ == "XLMRobertaTokenizer"
    tokens = loaded_processor.tokenizer(["左上角有一个大的红色圆形", "Kreis in Rot, groß, oben links"], padding=True, return_tensors="pt")
    torch.testing.assert_close(
        text_features(loaded, tokens["input_ids"], tokens["attention_mask"]),
        text_features(model, tokens["input_ids"], tokens["attention_mask"]),
    )
    assert not (tmp_path / ".tmp-base_model").exists()


def test_swap_errors_name_the_recipe_key(tiny_clip_dir, tiny_xlmr_dir, tmp_path):
    with pytest.raises(
        TextSwapError, match=r"model\.name_or_path: model\.text_tower swaps the text tower of a CLIP checkpoint; .* is a XLMRobertaConfig"
    ):
        text_swap_config(str(tiny_xlmr_dir), str(tiny_xlmr_dir))
    with pytest.raises(TextSwapError, match=r"model\.text_tower: could not load a text encoder config from local folder"):
        text_swap_config(str(tiny_clip_dir), str(tmp_path))
    with pytest.raises(TextSwapError, match=r"model\.text_tower: a CLIPConfig text encoder is not in the model table"):
        text_swap_config(str(tiny_clip_dir), str(tiny_clip_dir))


def test_distillation_loss_matches_a_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    terms = DistillationLoss(mse_weight=2.0, cosine_weight=0.5)(student, teacher)
    assert set(terms) == {"distill_mse", "distill_cosine"}
    torch.testing.assert_close(terms["distill_mse"], 2.0 * ((student - teacher) ** 2).mean())
    cos = (student * teacher).sum(-1) / (student.norm(dim=-1) * teacher.norm(dim=-1))
    torch.testing.assert_close(terms["distill_cosine"], 0.5 * (1 - cos).mean())
    assert set(DistillationLoss(1.0, 0.0)(student, teacher)) == {"distill_mse"}


def settings(text_training: str, steps: int) -> DistillSettings:
    return DistillSettings(
        text_training=text_training,
        mse_weight=1.0,
        cosine_weight=1.0,
        lr=3e-3,
        batch_size=16,
        max_steps=steps,
        warmup_steps=0,
        betas=(0.9, 0.98),
        eps=1e-6,
        weight_decay=0.0,
        max_grad_norm=1.0,
        scheduler="constant",
        seed=0,
        log_every_steps=1,
    )


@pytest.mark.parametrize("text_training", ["full", "lora"])
def test_distillation_moves_only_the_text_side_towards_the_teacher(swapped, tiny_clip_dir, text_training, tmp_path):
    from accelerate import Accelerator

    model, processor = swapped
    teacher = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    teacher_tokenizer = CLIPProcessor.from_pretrained(tiny_clip_dir).tokenizer
    rows = parallel_text_rows(64, seed=0, languages=["en", "de", "zh"])
    pairs = [(rows[lang][i], rows["en"][i]) for i in range(64) for lang in ("en", "de", "zh")]
    collator = ParallelTextCollator(processor.tokenizer, teacher_tokenizer, 40, 32)
    probe = collator(pairs[:48])
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    vision_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(("text_model.", "text_projection."))}
    images_before = image_features(model, pixels)

    def probe_loss(m):
        with torch.no_grad():
            target = text_features(teacher, probe["teacher_input_ids"], probe["teacher_attention_mask"])
            return sum(DistillationLoss(1.0, 1.0)(text_features(m, probe["input_ids"], probe["attention_mask"]), target).values()).item()

    before = probe_loss(model)
    lora = TowerLora(enabled=True, rank=4, alpha=8.0, dropout=0.0, target_modules=("query", "value"), layers=None)
    log = tmp_path / "distill_log.jsonl"
    student, last = distill_text_tower(
        model,
        teacher,
        collator,
        pairs,
        settings=settings(text_training, 40),
        text_lora=lora,
        accelerator=Accelerator(cpu=True),
        log_file=log,
    )
    assert type(student) is VisionTextDualEncoderModel  # LoRA merged: an ordinary dual encoder either way
    assert not any("lora_" in n for n, _ in student.named_parameters())
    assert not any(p.requires_grad for p in student.parameters())
    assert probe_loss(student) < 0.7 * before, (before, probe_loss(student))
    after = student.state_dict()
    assert all(torch.equal(after[k], v) for k, v in vision_before.items())  # vision tower, projection, temperature
    assert torch.equal(image_features(student, pixels), images_before)
    assert len(log.read_text().splitlines()) == 40 and set(last) == {"distill_mse", "distill_cosine"}


def test_language_table_puts_languages_side_by_side():
    def metrics(r1):
        return {d: {"R@1": r1, "R@5": r1 + 10, "R@10": r1 + 20, "mean_rank": 2.0, "median_rank": 1.0} for d in ("t2i", "i2t")}

    results = {
        "zero_shot": {"en": metrics(1.0), "de": metrics(0.5)},
        "original_clip": {"en": metrics(70.0)},
        "adapted": {"en": metrics(69.0), "de": metrics(66.5)},
    }
    table = format_language_table(results, ["en", "de"], reference="original_clip")
    lines = table.splitlines()
    assert lines[0].split("|")[1:4] == [" lang ", " model         ", " t2i R@1 "]
    row = {
        tuple(c.strip() for c in line.split("|")[1:3]): [c.strip() for c in line.split("|")[3:-1]]
        for line in lines[2:]
        if line.startswith("| ")
    }
    assert row[("de", "adapted")] == ["66.50", "76.50", "86.50", "66.50", "76.50", "86.50", "-2.50"]
    assert row[("en", "original-clip")][-1] == "-1.00"  # the final model's English minus the original tower's
    assert row[("en", "zero-shot")][-1] == ""
