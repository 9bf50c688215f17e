"""Merging with a scale: merged == unmerged, alpha=0 is the base, alpha=1 the adapted model, trained
projections and logit scale survive, and the folder loads with plain CLIPModel.from_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import CLIPModel

from finetune.errors import ExportError
from finetune.export.merge import load_run_for_export, merge_at_alpha, save_export
from finetune.models.load import load_model
from finetune.models.towers import image_features, logit_scale, text_features
from tests.finetune.runs import make_run


def embed(model, processor):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens = processor(text=["large round opacity, crimson tint", "a small blue square", "two"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return image_features(model, pixels), text_features(model, tokens["input_ids"], tokens["attention_mask"])


def assert_close(a, b, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, atol=atol, rtol=1e-4)


def assert_differs(a, b, gap=1e-2):
    assert all((x - y).abs().max() > gap for x, y in zip(a, b))


@pytest.mark.parametrize("projections,scale", [(False, False), (True, True)])
def test_merged_equals_unmerged_and_alpha_ends_are_base_and_adapted(tmp_path, tiny_clip_dir, projections, scale):
    run = make_run(tmp_path / "run", tiny_clip_dir, train_projections=projections, train_logit_scale=scale)
    peft_model, processor, _, base_scale = load_run_for_export(run)
    base, _ = load_model(str(tiny_clip_dir))
    adapted = embed(peft_model, processor)
    assert_differs(adapted, embed(base, processor))  # the adapters are not a no-op

    assert_close(embed(merge_at_alpha(peft_model, 1.0, base_logit_scale=base_scale), processor), adapted)
    assert_close(embed(merge_at_alpha(peft_model, 0.0, base_logit_scale=base_scale), processor), embed(base, processor))
    half = embed(merge_at_alpha(peft_model, 0.5, base_logit_scale=base_scale), processor)
    assert_differs(half, adapted, 1e-3) and assert_differs(half, embed(base, processor), 1e-3)
    assert_close(embed(peft_model, processor), adapted)  # merging worked on a copy


def test_trained_projections_and_logit_scale_survive_the_merge_and_the_folder(tmp_path, tiny_clip_dir):
    run = make_run(tmp_path / "run", tiny_clip_dir, train_projections=True, train_logit_scale=True)
    peft_model, processor, cfg, base_scale = load_run_for_export(run)
    base, _ = load_model(str(tiny_clip_dir))
    merged = merge_at_alpha(peft_model, 1.0, base_logit_scale=base_scale)
    assert float(logit_scale(merged)) == pytest.approx(float(logit_scale(base)) + 0.7, abs=1e-5)
    assert not torch.equal(merged.visual_projection.weight, base.visual_projection.weight)
    half = merge_at_alpha(peft_model, 0.5, base_logit_scale=base_scale)
    assert float(logit_scale(half)) == pytest.approx(float(logit_scale(base)) + 0.35, abs=1e-5)
    torch.testing.assert_close(
        half.text_projection.weight, (base.text_projection.weight + merged.text_projection.weight) / 2, atol=1e-6, rtol=0
    )

    out = save_export(merged, processor, cfg, tmp_path / "export", {"alpha": 1.0})
    plain = CLIPModel.from_pretrained(out).eval()  # no PEFT, no toolkit code
    assert float(plain.logit_scale) == pytest.approx(float(logit_scale(merged)), abs=1e-6)
    assert_close(embed(plain, processor), embed(merged, processor))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["size_on_disk_bytes"] == (out / "model.safetensors").stat().st_size
    assert manifest["embedding_dim"] == merged.config.projection_dim
    assert len(manifest["weights_sha256"]) == 64 and (out / "config.yaml").is_file()


def test_negative_alpha_is_refused(run_dir):
    peft_model, *_ = load_run_for_export(run_dir)
    with pytest.raises(ExportError, match="--alpha must be >= 0"):
        merge_at_alpha(peft_model, -0.5)
