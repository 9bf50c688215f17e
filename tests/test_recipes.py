"""Every shipped recipe validates, documents its launch command, and names what it claims to."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import datasets
import pytest
import yaml

from finetune.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DEMO_CLIP = ROOT / "recipes" / "assets" / "demo-clip"


def test_the_recipe_tests_below_have_recipes_to_check():
    # An empty glob would leave every parametrized test below with nothing to run, silently.
    assert {p.stem for p in RECIPES} >= {"demo", "medical", "fashion"}


def test_glob_finds_the_shipped_recipes():
    assert {"demo", "medical", "fashion"} <= {p.stem for p in RECIPES}


def first_comment_block(path: Path) -> list[str]:
    """The leading `#` lines, with the `#` and surrounding spaces stripped."""
    block = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        block.append(line.lstrip("#").strip())
    return block


def load_recipe(path: Path, request, monkeypatch):
    """load_config as the README runs it: from the repository root; the demo model may not be built yet."""
    monkeypatch.chdir(ROOT)
    overrides = []
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    if model.get("name_or_path") == "recipes/assets/demo-clip" and not DEMO_CLIP.exists():
        overrides.append(f"model.name_or_path={request.getfixturevalue('tiny_clip_dir')}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = load_config(path, overrides)
    # A shipped recipe must not set keys that are then ignored.
    ignored = [str(w.message) for w in caught if "ignored" in str(w.message)]
    assert not ignored, ignored
    return cfg


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_validates(path, request, monkeypatch):
    cfg = load_recipe(path, request, monkeypatch)
    assert cfg.lora.vision.enabled or cfg.lora.text.enabled
    assert (cfg.train.max_steps is None) != (cfg.train.epochs is None)
    assert cfg.train.output_dir.startswith("runs/")


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_header_has_launch_command(path):
    block = first_comment_block(path)
    assert block, f"{path.name} has no leading comment block"
    assert f"accelerate launch finetune/train.py recipes/{path.name}" in block


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_output_dirs_are_distinct(path):
    # Two recipes writing to the same run folder would overwrite each other's checkpoints.
    out = {p.stem: yaml.safe_load(p.read_text()).get("train", {}).get("output_dir") for p in RECIPES}
    assert list(out.values()).count(out[path.stem]) == 1


def test_demo_is_offline(request, monkeypatch):
    cfg = load_recipe(ROOT / "recipes" / "demo.yaml", request, monkeypatch)
    specs = [cfg.data.train, cfg.data.eval.target, cfg.data.eval.source]
    assert all(s is not None and s.synthetic is not None and s.path is None for s in specs)
    assert cfg.data.train.synthetic.domain == "target" and cfg.data.eval.source.synthetic.domain == "source"
    # Eval renders are unseen: a different seed from training.
    assert cfg.data.eval.target.synthetic.seed != cfg.data.train.synthetic.seed


def test_medical_names_its_model_and_dataset(request, monkeypatch):
    cfg = load_recipe(ROOT / "recipes" / "medical.yaml", request, monkeypatch)
    assert cfg.model.name_or_path == "openai/clip-vit-base-patch16"
    for spec in (cfg.data.train, cfg.data.eval.target):
        assert spec.path == "mdwiratathya/ROCO-radiology"
        assert spec.caption_column == "caption"
        assert spec.image_column == "image"
        assert spec.image_id_column == "image_id"
    assert (cfg.data.train.split, cfg.data.eval.target.split) == ("train", "validation")


def test_fashion_names_its_dataset_and_columns(request, monkeypatch):
    cfg = load_recipe(ROOT / "recipes" / "fashion.yaml", request, monkeypatch)
    for spec in (cfg.data.train, cfg.data.eval.target):
        assert spec.path == "ashraq/fashion-product-images-small"
        assert spec.caption_column == "productDisplayName"
        assert spec.label_column == "articleType"


def parse_slice(spec: str) -> tuple[str, float, float]:
    """`train[:95%]` -> ("train", 0, 95); `train` -> ("train", 0, 100). Percent slices only."""
    m = re.fullmatch(r"(\w+)(?:\[(\d+(?:\.\d+)?)?%?:(\d+(?:\.\d+)?)?%?\])?", spec)
    assert m, f"cannot parse split {spec!r}"
    if "[" in spec:
        assert "%" in spec, f"{spec!r}: use percent slices so the split size does not matter"
    return m.group(1), float(m.group(2) or 0), float(m.group(3) or 100)


def test_parse_slice():
    assert parse_slice("train[:95%]") == ("train", 0.0, 95.0)
    assert parse_slice("train[95%:]") == ("train", 95.0, 100.0)
    assert parse_slice("train[10%:20%]") == ("train", 10.0, 20.0)
    assert parse_slice("validation") == ("validation", 0.0, 100.0)


def test_fashion_train_and_eval_slices_are_disjoint(request, monkeypatch):
    cfg = load_recipe(ROOT / "recipes" / "fashion.yaml", request, monkeypatch)
    train_split, eval_split = cfg.data.train.split, cfg.data.eval.target.split
    name_a, lo_a, hi_a = parse_slice(train_split)
    name_b, lo_b, hi_b = parse_slice(eval_split)
    assert name_a == name_b == "train"  # the dataset ships one split
    assert lo_a < hi_a and lo_b < hi_b
    assert hi_a <= lo_b or hi_b <= lo_a, f"{train_split} overlaps {eval_split}"
    # And as `datasets` resolves them (rounding included), for a few split sizes.
    for n in (100, 997, 44072):
        (a,) = datasets.ReadInstruction.from_spec(train_split).to_absolute({"train": n})
        (b,) = datasets.ReadInstruction.from_spec(eval_split).to_absolute({"train": n})
        assert set(range(a.from_, a.to)).isdisjoint(range(b.from_, b.to))
        assert a.to - a.from_ > 0 and b.to - b.from_ > 0
