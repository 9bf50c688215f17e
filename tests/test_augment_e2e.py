"""Augmentation through the real entry point (`finetune/train.py` main): it trains on augmented batches
only, evaluation never augments, a resumed augmented run equals an uninterrupted one, and the
pre-resized cache holds pre-augmentation images (the same weights with or without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from data_tools import collate
from finetune import train
from finetune.training.checkpoint import latest_checkpoint, read_trainer_state

SMALL = ["train.batch_size=8", "eval.batch_size=64", "train.log_every_steps=1", "data.num_workers=0"]
AUGMENT = [
    "augment.image.random_resized_crop.enabled=true",
    "augment.image.horizontal_flip.enabled=true",
    "augment.image.rotation.enabled=true",
    "augment.image.color_jitter={enabled: true, hue: 0.05}",
    "augment.text.word_dropout=0.2",
    "augment.text.word_swap=0.3",
    "augment.text.caption_templates=['{caption}', 'scan: {caption}']",
]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def demo(tiny_clip_dir, out: Path, steps: int) -> list[str]:
    return [
        "recipes/demo.yaml",
        f"model.name_or_path={tiny_clip_dir}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "train.checkpoint_every_steps=2",
        "data.train.synthetic.num_images=24",
        "data.eval.target.synthetic.num_images=12",
        "data.eval.source.synthetic.num_images=12",
        "data.replay=[{synthetic: {domain: source, num_images: 8, seed: 2}, fraction: 0.25}]",
        "optim.warmup_steps=1",
        *SMALL,
    ]


def trainable_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out / "checkpoints") / "trainable_0.safetensors")


def test_augmented_run_trains_on_augmented_batches_and_never_augments_evaluation(tiny_clip_dir, tmp_path, monkeypatch):
    calls = []
    real = collate.augment_images

    def counting(pixels, keys, seed, aug):
        calls.extend(keys)
        return real(pixels, keys, seed, aug)

    monkeypatch.setattr(collate, "augment_images", counting)
    assert train.main(demo(tiny_clip_dir, tmp_path / "plain", steps=3)) == 0
    assert calls == []  # off by default: the plain path
    AcceleratorState._reset_state(True)
    assert train.main([*demo(tiny_clip_dir, tmp_path / "aug", steps=3), *AUGMENT]) == 0
    # Only training batches, in epoch order: the 3 trained plus the one Accelerate's loader fetches ahead;
    # nothing from the zero-shot or final evaluation (which carry no keys and would show up here).
    assert calls == [(0, position) for position in range(32)]

    plain, aug = tmp_path / "plain", tmp_path / "aug"
    zero_plain = json.loads((plain / "eval" / "zero_shot.json").read_text())
    zero_aug = json.loads((aug / "eval" / "zero_shot.json").read_text())
    assert zero_aug == zero_plain  # evaluation sees the same pixels and captions
    assert read_trainer_state(latest_checkpoint(aug / "checkpoints"))["step"] == 3
    assert (aug / "adapter" / "adapter_model.safetensors").is_file()
    results = json.loads((aug / "eval" / "results.json").read_text())
    assert set(results) == {"zero_shot", "adapted", "linear_probe", "knn"} and results["adapted"]["target"]["t2i"]["R@10"] >= 0
    config = (aug / "config.yaml").read_text()
    assert "word_dropout: 0.2" in config and "scan: {caption}" in config
    a, b = trainable_tensors(plain), trainable_tensors(aug)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the augmented batches changed what was learned


class SimulatedKill(Exception):
    pass


def test_resumed_augmented_run_equals_an_uninterrupted_one(tiny_clip_dir, tmp_path, monkeypatch):
    dropout = ["lora.vision.dropout=0.1", "lora.text.dropout=0.1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    # 24 images x 2 captions + 25% replay = 64 rows / batch 8 = 8 batches an epoch. Checkpoints every 3 steps:
    # killed after step 10 was logged, the run resumes from step 9, one batch into epoch 1.
    dropout = [*dropout, "train.checkpoint_every_steps=3"]
    assert train.main([*demo(tiny_clip_dir, full, steps=10), *AUGMENT, *dropout]) == 0
    AcceleratorState._reset_state(True)

    real_append = train.append_log

    def log_then_die(path, record):
        real_append(path, record)
        if record.get("step") == 10:
            raise SimulatedKill(10)

    monkeypatch.setattr(train, "append_log", log_then_die)
    with pytest.raises(SimulatedKill):
        train.main([*demo(tiny_clip_dir, cut, steps=10), *AUGMENT, *dropout])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)
    state = read_trainer_state(latest_checkpoint(cut / "checkpoints"))
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (9, 1, 1)
    assert train.main([*demo(tiny_clip_dir, cut, steps=10), *AUGMENT, *dropout, "train.resume_from=latest"]) == 0

    a, b = trainable_tensors(full), trainable_tensors(cut)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    full_log = [json.loads(l) for l in (full / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    cut_log = [json.loads(l) for l in (cut / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    assert [r["step"] for r in cut_log] == list(range(1, 11))
    assert [r["infonce"] for r in cut_log] == pytest.approx([r["infonce"] for r in full_log], abs=1e-5)


def test_the_preresized_cache_holds_pre_augmentation_images(tiny_clip_dir, roco_like_dir, tmp_path):
    """data.cache_preprocessed stores resized, unaugmented images; augmentation runs after it, so the
    weights equal a run that decodes and resizes every time."""
    for name, cached in (("plain", "false"), ("cached", "true")):
        overrides = [
            f"model.name_or_path={tiny_clip_dir}",
            f"data.train.path={roco_like_dir}",
            f"data.eval.target.path={roco_like_dir}",
            f"train.output_dir={tmp_path / name}",
            "train.epochs=null",
            "train.max_steps=2",
            *SMALL,
            "eval.zero_shot=false",
            "data.max_text_length=32",
            f"data.cache_preprocessed={cached}",
            *AUGMENT,
        ]
        assert train.main(["recipes/medical.yaml", *overrides]) == 0
    plain, cached = trainable_tensors(tmp_path / "plain"), trainable_tensors(tmp_path / "cached")
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=0, atol=0, msg=name)
