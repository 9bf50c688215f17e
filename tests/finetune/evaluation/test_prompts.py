"""Class prompts from the data: a labelled set whose labels are codes is classified against what its
classes' captions say, the report says so, and the number equals an independent computation."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from accelerate.state import AcceleratorState

from data_tools.collate import encode_captions, preprocess_images
from data_tools.synthetic.domains import generate_domain
from finetune import train
from finetune.evaluation.baselines import knn, linear_probe
from finetune.evaluation.metrics import class_prompt_embedding
from finetune.evaluation.prompts import ClassPrompts, build_class_prompts, load_class_prompts, looks_like_codes
from finetune.models.adapter import load_adapted
from finetune.models.load import load_model
from finetune.models.towers import image_features, text_features

SHAPES = ["circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star"]
CODE = {shape: str(i) for i, shape in enumerate(SHAPES)}  # the label column holds codes, as most real ones do


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def test_precedence_templates_then_label_names_then_training_then_own_captions_then_bare_label():
    common = dict(own_captions={"0": ["own zero"], "1": ["own one"]}, train_captions={"0": ["train zero a", "train zero b"]})
    templated = build_class_prompts("data.eval.target", ["0", "1"], caption_templates=["a {label}"], label_names={"0": "zero"}, **common)
    assert templated.prompts == {"0": ["a zero"], "1": ["a 1"]} and set(templated.sources.values()) == {"caption_templates"}
    named = build_class_prompts("data.eval.target", ["0", "1"], caption_templates=None, label_names={"0": "zero"}, **common)
    assert named.prompts == {"0": ["zero"], "1": ["own one"]} and named.sources == {"0": "label_names", "1": "own_captions"}
    data = build_class_prompts("data.eval.target", ["0", "1", "2"], caption_templates=None, label_names=None, **common)
    assert data.prompts == {"0": ["train zero a", "train zero b"], "1": ["own one"], "2": ["2"]}
    assert data.sources == {"0": "train_captions", "1": "own_captions", "2": "bare_label"}
    assert data.warning is not None and "data.eval.target.caption_templates" in data.warning and "'2'" in data.warning
    assert "captions of the class in data.train (1 class)" in data.describe() and "'train zero a' / 'train zero b'" in data.describe()
    words = build_class_prompts(
        "source", ["melanoma", "nevus"], caption_templates=None, label_names=None, own_captions=None, train_captions=None
    )
    assert words.prompts == {"melanoma": ["melanoma"], "nevus": ["nevus"]} and words.warning is None  # words, not codes


def test_a_class_with_many_captions_keeps_a_seeded_draw():
    many = {"0": [f"caption {i}" for i in range(100)]}
    a = build_class_prompts("data.eval.t", ["0"], caption_templates=None, label_names=None, own_captions=None, train_captions=many, seed=1)
    b = build_class_prompts("data.eval.t", ["0"], caption_templates=None, label_names=None, own_captions=None, train_captions=many, seed=1)
    c = build_class_prompts("data.eval.t", ["0"], caption_templates=None, label_names=None, own_captions=None, train_captions=many, seed=2)
    assert a.prompts == b.prompts and a.prompts != c.prompts and len(a.prompts["0"]) == 32
    assert ClassPrompts.from_json(json.loads(json.dumps(a.to_json()))) == a


@pytest.mark.parametrize(
    ("labels", "codes"),
    [(["0", "1", "2"], True), (["mel", "nv", "bcc"], True), (["C34.1", "C50.9"], True), (["NORMAL", "PNEUMONIA"], True)],
)
def test_code_like_labels(labels, codes):
    assert looks_like_codes(labels) is codes
    assert not looks_like_codes(["melanoma", "benign nevus", "basal cell carcinoma"])


def test_ragged_prompt_ensemble_is_the_mean_of_normalised_prompts():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 4, generator=g)
    prompt_class = torch.tensor([0, 0, 0, 1, 1])
    got = class_prompt_embedding(emb, prompt_class, 2)
    unit = F.normalize(emb, dim=-1)
    want = F.normalize(torch.stack([unit[:3].mean(0), unit[3:].mean(0)]), dim=-1)
    torch.testing.assert_close(got, want)
    equal = torch.randn(2, 3, 4, generator=g)  # the (C, T, D) form gives the same as the ragged one
    torch.testing.assert_close(
        class_prompt_embedding(equal), class_prompt_embedding(equal.reshape(6, 4), torch.tensor([0, 0, 0, 1, 1, 1]), 2)
    )


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def coded_dir(tmp_path_factory) -> Path:
    """Target-domain renders whose label column holds codes `0`..`7` and whose captions spell the shape out."""
    root = tmp_path_factory.mktemp("coded")
    (root / "data").mkdir()
    for split, n, seed in (("train", 64, 0), ("validation", 40, 1)):
        cols = generate_domain("target", n, captions_per_image=1, image_size=32, seed=seed)
        ds = datasets.Dataset.from_dict(
            {
                "image": [{"bytes": _png(i), "path": None} for i in cols["image"]],
                "text": [c[0] for c in cols["caption"]],
                "code": [CODE[label] for label in cols["label"]],
            },
            features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"), "code": datasets.Value("string")}),
        )
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


def test_code_labels_are_classified_against_the_class_captions_and_the_report_says_so(tiny_clip_dir, coded_dir, tmp_path, capsys):
    out = tmp_path / "run"
    spec = {"path": str(coded_dir), "caption_column": "text", "label_column": "code"}
    recipe = {
        "model": {"name_or_path": str(tiny_clip_dir)},
        "data": {
            "train": {**spec, "split": "train"},
            "eval": {"target": {**spec, "split": "validation"}},
            "num_workers": 0,
            "max_text_length": 32,
        },
        "train": {"output_dir": str(out), "max_steps": 3, "batch_size": 16, "log_every_steps": 1, "mixed_precision": "no"},
        "eval": {"batch_size": 64},
    }
    path = tmp_path / "coded.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert train.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "Eval set target: class prompts from captions of the class in data.train (8 classes)" in printed

    # The reported adapted top-1 equals an independent computation on the saved adapter: each class's distinct
    # training captions, embedded, normalised, averaged; each eval image assigned the closest class.
    results = json.loads((out / "eval" / "results.json").read_text())
    model, processor = load_adapted(out)
    train_rows = datasets.load_dataset("parquet", data_files=str(coded_dir / "data" / "train-*.parquet"), split="train")
    eval_rows = datasets.load_dataset("parquet", data_files=str(coded_dir / "data" / "validation-*.parquet"), split="train")
    classes = sorted(set(eval_rows["code"]))
    with torch.no_grad():
        class_emb = []
        for c in classes:
            texts = list(dict.fromkeys(t for t, code in zip(train_rows["text"], train_rows["code"]) if code == c))
            tokens = encode_captions(processor, texts, 32)
            class_emb.append(
                F.normalize(F.normalize(text_features(model, tokens["input_ids"], tokens["attention_mask"]), dim=-1).mean(0), dim=-1)
            )
        pixels = preprocess_images(processor, [img.convert("RGB") for img in eval_rows["image"]])
        scores = F.normalize(image_features(model, pixels), dim=-1) @ torch.stack(class_emb).T  # (N, C)
    predicted = [classes[i] for i in scores.argmax(1).tolist()]
    independent = 100.0 * np.mean([p == t for p, t in zip(predicted, eval_rows["code"])])
    assert results["adapted"]["target"]["classification"]["top1"] == pytest.approx(independent, abs=1.0)

    # The baselines beside them are the baselines module on the base model's frozen features, computed here again.
    assert set(results) == {"zero_shot", "linear_probe", "knn", "adapted"}
    header = next(line for line in printed.splitlines() if line.startswith("| set"))
    assert [c.strip() for c in header.strip("|").split("|")][3:] == ["zero-shot", "adapted", "linear-probe", "knn", "delta"]
    base, _ = load_model(str(tiny_clip_dir))
    with torch.no_grad():
        frozen = {
            split: F.normalize(
                image_features(base, preprocess_images(processor, [i.convert("RGB") for i in rows["image"]])), dim=-1
            ).numpy()
            for split, rows in (("train", train_rows), ("eval", eval_rows))
        }
    for kind, fit in (("linear_probe", linear_probe), ("knn", knn)):
        want = fit(frozen["train"], list(train_rows["code"]), frozen["eval"], list(eval_rows["code"]), seed=0)
        assert results[kind]["target"]["classification"]["top1"] == pytest.approx(want.top1, abs=1e-6), kind

    saved = load_class_prompts(out / "eval" / "class_prompts.json")
    assert set(saved["target"].sources.values()) == {"train_captions"} and sorted(saved["target"].prompts) == classes
    notes = (out / "eval" / "results.md").read_text()
    assert "Classification: class prompts from captions of the class in data.train (8 classes)" in notes
    assert "bare label" not in notes  # the bare codes were never the prompts, so nothing is reported as if they were


def test_a_labelled_language_eval_set_gets_class_prompts_under_its_own_recipe_key():
    """data.eval.languages.<code> sets are classified like target and source, and warnings name their key."""
    from data_tools.loading import RetrievalSet, load_image_text_dataset
    from finetune.config.load import validate_config
    from finetune.config.specs import dataset_arguments, eval_specs
    from finetune.evaluation.prompts import prompts_for_sets

    labelled = {"synthetic": {"domain": "target", "num_images": 8, "seed": 1}, "label_column": "label"}
    cfg = validate_config(
        {
            "model": {"name_or_path": "unused"},
            "data": {"train": {"synthetic": {"domain": "target", "num_images": 8}}, "eval": {"languages": {"de": labelled}}},
            "train": {"max_steps": 1},
        }
    )
    sets = {
        name: RetrievalSet.from_pairs(load_image_text_dataset(key=name, **dataset_arguments(spec, 0)))
        for name, spec in eval_specs(cfg).items()
    }
    prompts = prompts_for_sets(cfg, sets, train_captions=None)
    assert list(prompts) == ["de"]
    assert set(prompts["de"].sources.values()) == {"own_captions"}  # its own captions: data.train has no labels here
    coded = build_class_prompts(
        "data.eval.languages.de", ["0", "1"], caption_templates=None, label_names=None, own_captions=None, train_captions=None
    )
    assert "set data.eval.languages.de.caption_templates" in coded.warning
