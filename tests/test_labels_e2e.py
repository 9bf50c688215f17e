"""End to end through the real entry points: a label-only recipe, resume with a non-uniform sampler and
replay, the data report, and the recipe errors of the label features."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from data_tools.loading import load_image_text_dataset
from data_tools.synthetic.domains import generate_domain
from data_tools.templates import EpochCaptions
from finetune import train
from finetune.cli import main as cli
from finetune.config.load import load_config
from finetune.errors import ConfigError, DataLoadError
from finetune.training.checkpoint import latest_checkpoint, read_trainer_state

SMALL = ["train.batch_size=8", "eval.batch_size=64", "train.log_every_steps=1", "data.num_workers=0"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def ham_like_dir(tmp_path_factory) -> Path:
    """HAM10000's columns (image, image_id, lesion_id, dx), no captions; train and validation parquet splits."""
    root = tmp_path_factory.mktemp("ham-like")
    (root / "data").mkdir()
    for split, n, seed in (("train", 40, 0), ("validation", 16, 1)):
        cols = generate_domain("target", n, image_size=32, seed=seed)
        ds = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": png(i), "path": None} for i in cols["image"]],
                "image_id": [f"ISIC_{split}_{i}" for i in range(n)],
                "lesion_id": [f"HAM_{i}" for i in range(n)],
                "dx": cols["label"],
            },
            features=datasets.Features(
                {
                    "image": datasets.Image(),
                    "image_id": datasets.Value("string"),
                    "lesion_id": datasets.Value("string"),
                    "dx": datasets.Value("string"),
                }
            ),
        )
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_label_only_recipe_trains_and_reports_class_level_numbers(tiny_clip_dir, ham_like_dir, tmp_path, capsys):
    out = tmp_path / "skin"
    overrides = [
        f"model.name_or_path={tiny_clip_dir}",
        f"data.train.path={ham_like_dir}",
        f"data.eval.target.path={ham_like_dir}",
        f"train.output_dir={out}",
        "train.epochs=null",
        "train.max_steps=3",
        "train.mixed_precision=no",
        "data.max_text_length=32",
        *SMALL,
    ]
    assert train.main(["recipes/skin_lesions.yaml", *overrides]) == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    for model in ("zero_shot", "adapted"):
        target = results[model]["target"]
        assert set(target) >= {"t2i", "i2t", "classification", "class_retrieval", "long_tail", "per_class"}
        assert 0 <= target["classification"]["top1"] <= target["classification"]["top5"] <= 100
        assert set(target["per_class"]) == set(generate_domain("target", 16, image_size=32, seed=1)["label"])
        assert {v["group"] for v in target["per_class"].values()} <= {"head", "medium", "tail"}
    md = (out / "eval" / "results.md").read_text()
    assert "instance recall misleads" in md and "## Per class: target" in md
    # class-level rows lead the table of a label-only set
    table_rows = [line for line in md.splitlines() if line.startswith("| target")]
    assert table_rows[0].startswith("| target | classification")
    assert (out / "eval" / "results_per_class.png").read_bytes()[:4] == b"\x89PNG"
    card = (out / "README.md").read_text()
    assert "negatives per pair after same-image and same-label masking" in card
    assert "sampling power (power 0.5)" in card


def test_label_only_captions_draw_a_template_per_epoch_deterministically(ham_like_dir):
    kwargs = dict(
        key="data.train",
        path=str(ham_like_dir),
        split="train",
        caption_column=None,
        label_column="dx",
        caption_templates=["a {label} scan", "{label}, close up", "finding: {label}"],
        label_names={"circle": "round"},
    )
    pairs = load_image_text_dataset(**kwargs)
    assert len(pairs) == 40 and all(len(c) == 3 for c in pairs["caption_choices"])
    assert any("round" in c for c in pairs["caption"]) and not any("circle" in c for c in pairs["caption"])
    epochs = []
    for epoch in range(3):
        view = EpochCaptions(pairs, seed=7)
        view.epoch = epoch
        epochs.append([view[i]["caption"] for i in range(len(view))])
        again = EpochCaptions(pairs, seed=7)
        again.epoch = epoch
        assert [again[i]["caption"] for i in range(len(again))] == epochs[-1]  # same (seed, epoch): same captions
    assert epochs[0] != epochs[1] != epochs[2]
    with pytest.raises(DataLoadError, match="data.train.label_column: column 'diagnosis' not in"):
        load_image_text_dataset(**{**kwargs, "label_column": "diagnosis"})


def test_resume_with_long_tail_sampler_weights_masking_and_replay_ends_bit_identical(tiny_clip_dir, tmp_path, monkeypatch):
    def overrides(out):
        return [
            f"model.name_or_path={tiny_clip_dir}",
            f"train.output_dir={out}",
            "train.max_steps=6",
            "train.checkpoint_every_steps=2",
            "data.train.synthetic.num_images=24",
            "data.eval.target.synthetic.num_images=12",
            "data.eval.source.synthetic.num_images=12",
            "optim.warmup_steps=1",
            "sampling.kind=repeat_factor",
            "sampling.repeat_threshold=0.3",
            "loss.class_weights=effective_number",
            "loss.same_label_negatives=false",
            "data.replay=[{synthetic: {domain: source, num_images: 10, seed: 4}, fraction: 0.25}]",
            *SMALL,
        ]

    full = tmp_path / "full"
    assert train.main(["recipes/demo.yaml", *overrides(full)]) == 0
    AcceleratorState._reset_state(True)

    class Killed(Exception):
        pass

    cut = tmp_path / "cut"
    real_append = train.append_log

    def die_after_5(path, record):
        real_append(path, record)
        if record.get("step") == 5:
            raise Killed

    monkeypatch.setattr(train, "append_log", die_after_5)
    with pytest.raises(Killed):
        train.main(["recipes/demo.yaml", *overrides(cut)])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)
    assert read_trainer_state(latest_checkpoint(cut / "checkpoints"))["step"] == 4
    assert train.main(["recipes/demo.yaml", *overrides(cut), "train.resume_from=latest"]) == 0
    a = load_file(latest_checkpoint(full / "checkpoints") / "trainable_0.safetensors")
    b = load_file(latest_checkpoint(cut / "checkpoints") / "trainable_0.safetensors")
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name
    log_a = [json.loads(l)["infonce"] for l in (full / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    log_b = [json.loads(l)["infonce"] for l in (cut / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    assert log_a == log_b and len(log_a) == 6


def test_data_inspect_counts_bad_images_duplicates_and_leakage(tiny_clip_dir, tmp_path, capsys):
    cols = generate_domain("target", 12, image_size=32, seed=3)
    images = [png(i) for i in cols["image"]]
    images[1] = b""  # zero bytes
    images[2] = b"not an image at all"  # unreadable
    images[3] = images[3][: len(images[3]) // 2]  # truncated PNG
    images[5] = images[4]  # exact duplicate
    captions = [c[0] for c in cols["caption"]]
    captions[6] = "   "  # empty caption
    ds = datasets.Dataset.from_dict(
        {"image": [{"bytes": b, "path": None} for b in images], "caption": captions, "label": cols["label"]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"), "label": datasets.Value("string")}),
    )
    data = tmp_path / "data"
    data.mkdir()
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    out = tmp_path / "report"
    code = cli.main(
        [
            "data",
            "inspect",
            "recipes/demo.yaml",
            f"model.name_or_path={tiny_clip_dir}",
            "data.train.synthetic=null",
            f"data.train.path={data}",
            "data.eval.target.synthetic=null",
            f"data.eval.target.path={data}",
            "data.eval.target.label_column=label",
            "data.eval.source=null",
            "data.replay=[]",
            "data.max_text_length=8",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "data_report.json").read_text())
    train_report = report["data.train"]
    assert train_report["rows"] == 11 and train_report["unique_images"] == 11
    assert train_report["empty_captions"] == 1 and train_report["empty_captions_first_rows"] == [6]
    assert {k: v["count"] for k, v in train_report["images"].items()} == {"missing": 0, "zero_byte": 1, "unreadable": 1, "truncated": 1}
    assert train_report["images"]["truncated"]["first_rows"] == [3]
    assert train_report["duplicate_images"]["first_groups_rows"] == [[4, 5]]
    assert train_report["captions_over_limit"] > 0
    assert sum(train_report["classes"]["images_per_class"].values()) == 11
    # the eval set is the same file: every image with content leaks (all but the zero-byte one)
    assert report["data.eval.target"]["leaked_from_train"] == 10
    assert "leakage: 10 images also in the training data" in printed and "zero_byte 1 (rows [1])" in printed
    assert (out / "longtail.png").read_bytes()[:4] == b"\x89PNG"


def test_label_feature_mistakes_are_recipe_errors_reported_together(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_config(
            "recipes/demo.yaml",
            [
                "data.train.label_column=null",
                "sampling.kind=class_balanced",
                "data.eval.target.caption_templates=[a picture]",
            ],
        )
    text = str(exc.value)
    assert (
        "data.eval.target.caption_templates: Value error, template 0 ('a picture') has no {label} placeholder" in text
        or "data.eval.target.caption_templates: template 0 ('a picture') has no {label} placeholder" in text
    )
    with pytest.raises(ConfigError, match="need class labels: set data.train.label_column"):
        load_config("recipes/demo.yaml", ["data.train.label_column=null", "sampling.kind=class_balanced"])
    with pytest.raises(ConfigError, match="data.replay: fractions sum to 1.1"):
        load_config(
            "recipes/demo.yaml",
            [
                "data.replay=[{synthetic: {domain: source, num_images: 4}, fraction: 0.6}, {synthetic: {domain: source, num_images: 4}, fraction: 0.5}]"
            ],
        )
    with pytest.raises(ConfigError, match="caption_column is null"):
        load_config("recipes/demo.yaml", ["data.train.caption_column=null"])


def test_a_tiny_model_trains_at_twice_its_size_and_reloads_with_it(tiny_clip_dir, tmp_path):
    from data_tools.collate import preprocess_images
    from finetune.models.adapter import load_adapted
    from finetune.models.lora import encode_images

    out = tmp_path / "big"
    overrides = [
        f"model.name_or_path={tiny_clip_dir}",
        f"train.output_dir={out}",
        "train.max_steps=2",
        "data.image_size=64",
        "data.train.synthetic.num_images=16",
        "data.train.synthetic.image_size=64",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source=null",
        "data.replay=[]",
        *SMALL,
    ]
    assert train.main(["recipes/demo.yaml", *overrides]) == 0
    model, processor = load_adapted(out)
    assert model.get_base_model().config.vision_config.image_size == 32  # the checkpoint's native size
    image = generate_domain("target", 1, image_size=64, seed=9)["image"][0]
    pixels = preprocess_images(processor, [image])
    assert tuple(pixels.shape[-2:]) == (64, 64)  # the saved processor keeps data.image_size
    with torch.no_grad():
        assert encode_images(model, pixels).shape[0] == 1  # position embeddings interpolated, no size error
    results = json.loads((out / "eval" / "results.json").read_text())
    assert results["adapted"]["target"]["t2i"]["R@1"] >= 0
