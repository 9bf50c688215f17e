"""Multilingual data on the recipe path: per-language eval sets through the loader, and the parallel text
a distillation stage reads (data_tools/multilingual.py)."""

from __future__ import annotations

import datasets
import pytest

from data_tools.loading import load_image_text_dataset
from data_tools.multilingual import load_parallel_text
from data_tools.synthetic.multilingual import translate_source_caption
from finetune.errors import DataLoadError


def test_loader_builds_per_language_sets_through_the_recipe_path():
    pairs = load_image_text_dataset(key="data.eval.languages.es", synthetic=dict(domain="source", num_images=4, seed=1, languages=["es"]))
    english = load_image_text_dataset(key="data.eval.languages.en", synthetic=dict(domain="source", num_images=4, seed=1))
    assert pairs["image_id"] == english["image_id"]
    assert pairs["caption"] == [translate_source_caption(c, "es") for c in english["caption"]]


def test_load_parallel_text_pairs_every_translation_with_its_english(tmp_path):
    texts, english = load_parallel_text(
        "distill.data",
        path=None,
        name=None,
        revision=None,
        data_files=None,
        split="train",
        english_column="en",
        text_columns=["de", "es"],
        include_english=True,
        max_samples=10,
        synthetic=dict(domain="source", num_samples=20, seed=0, languages=["en", "de", "es"]),
    )
    assert len(texts) == len(english) == 10 * 3
    assert texts[:3] == [english[0], translate_source_caption(english[0], "de"), translate_source_caption(english[0], "es")]

    csv = tmp_path / "parallel.csv"
    datasets.Dataset.from_dict({"caption_eng": ["a dog", "", "a cat"], "caption_multi": ["ein Hund", "leer", ""]}).to_csv(str(csv))
    texts, english = load_parallel_text(
        "distill.data",
        path="csv",
        name=None,
        revision=None,
        data_files=str(csv),
        split="train",
        english_column="caption_eng",
        text_columns=["caption_multi"],
        include_english=False,
        max_samples=None,
        synthetic=None,
    )
    assert (texts, english) == (["ein Hund"], ["a dog"])  # empty English or translation: dropped
    with pytest.raises(DataLoadError, match=r"distill\.data\.text_columns: no column 'caption_de' .*columns: caption_eng, caption_multi"):
        load_parallel_text(
            "distill.data",
            path="csv",
            name=None,
            revision=None,
            data_files=str(csv),
            split="train",
            english_column="caption_eng",
            text_columns=["caption_de"],
            include_english=True,
            max_samples=None,
            synthetic=None,
        )
