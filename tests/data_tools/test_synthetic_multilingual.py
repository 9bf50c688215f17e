"""The demo's synthetic parallel captions (data_tools/synthetic/multilingual.py): one-to-one translations,
per-language eval sets, parallel rows; and the XLM-R-format tokenizer the multilingual demo trains
(data_tools/synthetic/tokenizer.py)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer, XLMRobertaConfig

from data_tools.synthetic.domains import generate_domain
from data_tools.synthetic.multilingual import (
    SYNTHETIC_LANGUAGES,
    all_multilingual_caption_text,
    generate_synthetic,
    parallel_text_rows,
    translate_source_caption,
)
from data_tools.synthetic.tokenizer import train_xlmr_tokenizer

ROOT = Path(__file__).resolve().parents[2]
CJK = re.compile(r"[\u4e00-\u9fff]")


def test_translations_are_one_to_one_and_keep_the_template():
    en = "a large red circle in the top left"
    assert translate_source_caption(en, "de") == "Kreis in Rot, groß, oben links"
    assert translate_source_caption(en, "es") == "círculo de color rojo, tamaño grande, arriba a la izquierda"
    assert translate_source_caption(en, "zh") == "左上角有一个大的红色圆形"
    assert translate_source_caption(en, "en") == en
    texts = all_multilingual_caption_text()
    assert len(texts) == 8 * 6 * 2 * 5 * 3 * len(SYNTHETIC_LANGUAGES)
    # No two concepts share a caption in any language: every caption names one concept.
    for k, lang in enumerate(SYNTHETIC_LANGUAGES):
        assert len(set(texts[k :: len(SYNTHETIC_LANGUAGES)])) == len(texts) // len(SYNTHETIC_LANGUAGES), lang
    with pytest.raises(ValueError, match="not a source-domain caption"):
        translate_source_caption("large round opacity, crimson tint, upper left", "de")


def test_a_language_eval_set_has_the_english_sets_images_and_translated_captions():
    english = generate_domain("source", 6, captions_per_image=2, image_size=32, seed=5)
    chinese = generate_synthetic("source", 6, captions_per_image=2, image_size=32, seed=5, languages=["zh"])
    both = generate_synthetic("source", 6, captions_per_image=2, image_size=32, seed=5, languages=["en", "de"])
    assert chinese["image_id"] == english["image_id"] and chinese["label"] == english["label"]
    for a, b in zip(chinese["image"], english["image"]):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    for zh, en, mixed in zip(chinese["caption"], english["caption"], both["caption"]):
        assert zh == [translate_source_caption(c, "zh") for c in en]
        assert all(CJK.search(c) and not re.search(r"[A-Za-z]", c) for c in zh)  # a non-Latin script
        assert mixed == en + [translate_source_caption(c, "de") for c in en]  # language-major
    assert generate_synthetic("source", 6, 2, 32, 5, languages=["en"])["caption"] == english["caption"]
    with pytest.raises(ValueError, match="source domain only"):
        generate_synthetic("target", 2, languages=["de"])
    with pytest.raises(ValueError, match=r"\['fr'\] not among"):
        generate_synthetic("source", 2, languages=["fr"])


def test_parallel_rows_are_translations_of_each_other():
    rows = parallel_text_rows(50, seed=3, languages=["en", "de", "zh"])
    assert set(rows) == {"en", "de", "zh"} and all(len(v) == 50 for v in rows.values())
    for i in range(50):
        assert rows["de"][i] == translate_source_caption(rows["en"][i], "de")
        assert rows["zh"][i] == translate_source_caption(rows["en"][i], "zh")
    assert parallel_text_rows(50, seed=3, languages=["en"])["en"] == rows["en"]  # same seed, same rows


def test_tokenizer_saves_in_xlmr_format_and_reads_every_language(tmp_path):
    texts = all_multilingual_caption_text()
    tokenizer = train_xlmr_tokenizer(texts, vocab_size=400, max_length=40)
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "XLMRobertaTokenizer"
    assert [loaded.bos_token_id, loaded.pad_token_id, loaded.eos_token_id, loaded.unk_token_id] == [0, 1, 2, 3]
    ids = loaded(texts)["input_ids"]
    assert all(row[0] == 0 and row[-1] == 2 for row in ids)
    assert not any(loaded.unk_token_id in row for row in ids)  # every character of every language is known
    for text, row in zip(texts[:8], ids[:8]):
        assert loaded.decode(row, skip_special_tokens=True) == text
    assert loaded("火星")["input_ids"][1:-1].count(loaded.unk_token_id) >= 1  # unseen characters: <unk>, not dropped


def test_shipped_demo_text_tower_reads_every_caption_whole():
    folder = ROOT / "recipes" / "assets" / "demo-xlmr"
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = XLMRobertaConfig.from_pretrained(folder)
    limit = config.max_position_embeddings - config.pad_token_id - 1
    lengths = [len(row) for row in tokenizer(all_multilingual_caption_text())["input_ids"]]
    assert max(lengths) <= limit and config.vocab_size == len(tokenizer)
    assert sum(f.stat().st_size for f in folder.iterdir()) < 5 * 2**20
