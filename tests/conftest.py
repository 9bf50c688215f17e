"""Shared fixtures: a tiny CLIP folder built from a config, and small local stand-ins for the
hub datasets the recipes name (same columns, same splits, loaded through `load_dataset`)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

import datasets  # noqa: E402

from data_tools.synthetic.domains import all_caption_text, generate_domain  # noqa: E402
from finetune.models.tiny_clip import build_tiny_clip, save_clip_folder  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """2 layers, width 32, 32x32 images: a real CLIPModel/CLIPProcessor folder, untrained. Initialised from a
    fixed seed: the same model whichever tests ran before it (some tests need its zero-shot ranking to
    leave mined negatives)."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model, processor = build_tiny_clip(all_caption_text(per_domain=150), vocab_size=40, width=32, layers=2)
    return save_clip_folder(model, processor, tmp_path_factory.mktemp("tiny-clip"))


def _synthetic_rows(domain: str, n: int, seed: int) -> dict:
    cols = generate_domain(domain, n, captions_per_image=1, image_size=32, seed=seed)
    return {**cols, "caption": [c[0] for c in cols["caption"]]}


@pytest.fixture(scope="session")
def tiny_xlmr_dir(tmp_path_factory) -> Path:
    """A tiny XLM-R (2 layers, width 32, no dropout) with the XLM-R-format tokenizer of the multilingual demo
    captions. No dropout keeps the comparisons of these tests free of RNG-order questions."""
    from scripts.build_multilingual_base import build_tiny_xlmr

    model, tokenizer = build_tiny_xlmr(vocab_size=600, width=32, layers=2, max_length=40, seed=0, dropout=0.0)
    out = tmp_path_factory.mktemp("tiny-xlmr")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def roco_like_dir(tmp_path_factory) -> Path:
    """Parquet splits train/validation/test with ROCO-radiology's columns: image, image_id, caption."""
    root = tmp_path_factory.mktemp("roco-like")
    features = datasets.Features({"image": datasets.Image(), "image_id": datasets.Value("string"), "caption": datasets.Value("string")})
    for split, n, seed in (("train", 48, 0), ("validation", 16, 1), ("test", 16, 2)):
        rows = _synthetic_rows("target", n, seed)
        ds = datasets.Dataset.from_dict(
            {"image": rows["image"], "image_id": [f"ROCO_{split}_{i:05d}" for i in range(n)], "caption": rows["caption"]},
            features=features,
        )
        (root / "data").mkdir(exist_ok=True)
        ds.to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
    return root


@pytest.fixture(scope="session")
def fashion_like_dir(tmp_path_factory) -> Path:
    """One parquet train split with fashion-product-images-small's columns (productDisplayName, articleType...)."""
    root = tmp_path_factory.mktemp("fashion-like")
    rows = _synthetic_rows("target", 64, 3)
    n = len(rows["image"])
    ds = datasets.Dataset.from_dict(
        {
            "id": list(range(10000, 10000 + n)),
            "gender": ["Women"] * n,
            "masterCategory": ["Apparel"] * n,
            "subCategory": ["Topwear"] * n,
            "articleType": rows["label"],
            "baseColour": ["Blue"] * n,
            "season": ["Summer"] * n,
            "year": [2012] * n,
            "usage": ["Casual"] * n,
            "productDisplayName": rows["caption"],
            "image": rows["image"],
        },
        features=datasets.Features(
            {
                "id": datasets.Value("int64"),
                "gender": datasets.Value("string"),
                "masterCategory": datasets.Value("string"),
                "subCategory": datasets.Value("string"),
                "articleType": datasets.Value("string"),
                "baseColour": datasets.Value("string"),
                "season": datasets.Value("string"),
                "year": datasets.Value("int64"),
                "usage": datasets.Value("string"),
                "productDisplayName": datasets.Value("string"),
                "image": datasets.Image(),
            }
        ),
    )
    (root / "data").mkdir()
    ds.to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    return root
