"""Tests for data_tools.collate: batches carry stable ids for surviving rows; unreadable batches never
raise; truncated captions are counted and the cut words named."""

from __future__ import annotations

import io

import datasets
import pytest
import torch
from PIL import Image

from data_tools.collate import (
    ImageTextCollator,
    TruncatedCaption,
    count_truncated_captions,
    encode_captions,
    format_truncation_warning,
    preprocess_images,
)
from data_tools.loading import decode_image, load_image_text_dataset
from data_tools.synthetic.domains import all_caption_text
from finetune.models.tiny_clip import build_tiny_clip


@pytest.fixture(scope="module")
def processor():
    _, processor = build_tiny_clip(all_caption_text(per_domain=50), vocab_size=300, width=32, layers=2)
    return processor


def png(color) -> dict:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


BROKEN = {"bytes": b"not an image", "path": None}


def row(image, caption, image_index, source_row, image_id, label=None) -> dict:
    out = {"image": image, "caption": caption, "image_index": image_index, "source_row": source_row, "image_id": image_id}
    if label is not None:
        out["label"] = label
    return out


def test_batch_keeps_ids_of_surviving_rows_aligned(processor):
    rows = [
        row(png((200, 0, 0)), "a large red circle in the top left", 0, 10, "img-a", "circle"),
        row(BROKEN, "a small blue square in the center", 1, 11, "img-b", "square"),
        row(png((0, 0, 200)), "a small blue ring in the center", 2, 12, "img-c", "ring"),
        row(png((200, 0, 0)), "a red circle, large, at the top left", 0, 10, "img-a", "circle"),
    ]
    batch = ImageTextCollator(processor, max_text_length=32)(rows)
    assert batch["corrupt_images"].item() == 1
    assert batch["image_index"].dtype == torch.int64 and batch["image_index"].tolist() == [0, 2, 0]
    assert batch["source_row"].dtype == torch.int64 and batch["source_row"].tolist() == [10, 12, 10]
    assert batch["image_id"] == ["img-a", "img-c", "img-a"]
    assert batch["label"] == ["circle", "ring", "circle"]
    # Tensors are the survivors, in order: equal to processing them directly.
    kept = [rows[0], rows[2], rows[3]]
    expected_pixels = preprocess_images(processor, [decode_image(r["image"]) for r in kept])
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"], expected_pixels, rtol=0, atol=0)
    tokens = encode_captions(processor, [r["caption"] for r in kept], 32)
    assert torch.equal(batch["input_ids"], tokens["input_ids"])
    assert torch.equal(batch["attention_mask"], tokens["attention_mask"])
    assert batch["input_ids"].shape[0] == 3


def test_all_unreadable_batch_is_empty_and_never_raises(processor):
    rows = [row(BROKEN, "a red circle", 0, 0, "0", "circle"), row({"bytes": b"", "path": None}, "a ring", 1, 1, "1", "ring")]
    batch = ImageTextCollator(processor, max_text_length=32)(rows)
    assert set(batch) == {"corrupt_images", "image_index", "source_row", "image_id", "label"}  # no pixel_values
    assert batch["corrupt_images"].item() == 2
    for name in ("image_index", "source_row"):
        assert batch[name].dtype == torch.int64 and batch[name].shape == (0,)
    assert batch["image_id"] == [] and batch["label"] == []


def test_collator_on_the_normal_form_without_labels(processor):
    ds = load_image_text_dataset(key="data.train", synthetic={"domain": "target", "num_images": 3, "captions_per_image": 2})
    batch = ImageTextCollator(processor, max_text_length=32)([ds[i] for i in range(len(ds))])
    assert "label" not in batch
    assert batch["image_index"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["source_row"].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch["image_id"] == ["0", "0", "1", "1", "2", "2"]
    assert batch["pixel_values"].shape == (6, 3, 32, 32) and batch["corrupt_images"].item() == 0


# --------------------------------------------------------------------------------------------------
# truncated captions


def test_count_truncated_captions_counts_and_names_the_cut_words(processor):
    tokenizer = processor.tokenizer
    short = "a red circle"  # 3 words + BOS + EOS = 5 tokens
    long = "finding: round crimson large lesion, upper left region shows a small azure wedge focus"
    captions = [short, long, short, long + " again"]
    lengths = [len(ids) for ids in tokenizer(captions)["input_ids"]]
    assert lengths[0] == 5 and lengths[1] == 18
    count, example = count_truncated_captions(tokenizer, captions, 12)
    assert count == 2
    # 12 tokens keep BOS, 10 caption tokens ("finding", ":", ... "region") and EOS.
    assert example == TruncatedCaption(caption=long, cut="shows a small azure wedge focus")
    kept = tokenizer.decode(tokenizer(long, truncation=True, max_length=12)["input_ids"], skip_special_tokens=True)
    assert kept.split()[-1] == "region"
    assert count_truncated_captions(tokenizer, captions, 18) == (1, TruncatedCaption(long + " again", "again"))
    assert count_truncated_captions(tokenizer, captions, 32) == (0, None)
    assert count_truncated_captions(tokenizer, [], 32) == (0, None)


def test_count_truncated_captions_reads_a_dataset_column(processor):
    # The trainer passes pairs["caption"] (a lazy datasets Column), not a list.
    long = "finding: round crimson large lesion, upper left region shows a small azure wedge focus"
    column = datasets.Dataset.from_dict({"caption": ["a red circle", long, "a ring"]})["caption"]
    assert not isinstance(column, list)
    assert count_truncated_captions(processor.tokenizer, column, 12) == (1, TruncatedCaption(long, "shows a small azure wedge focus"))


def test_cut_inside_a_word_reports_the_whole_word(processor):
    tokenizer = processor.tokenizer
    caption = "a red circle zzqx"  # the made-up word is several sub-word tokens
    pieces = tokenizer.tokenize(caption)
    assert pieces[:3] == ["a</w>", "red</w>", "circle</w>"] and len(pieces) > 5
    # BOS + 3 words + 1 piece of "zzqx" + EOS: the limit falls inside the last word.
    count, example = count_truncated_captions(tokenizer, [caption], 6)
    assert (count, example) == (1, TruncatedCaption(caption, "zzqx"))


def test_count_matches_a_caption_by_caption_reference_across_chunks(processor, monkeypatch):
    import data_tools.collate as collate

    monkeypatch.setattr(collate, "_TOKENIZE_CHUNK", 2)  # several chunks; the first hit is not in the first
    tokenizer = processor.tokenizer
    captions = all_caption_text(per_domain=10)[2:]
    limit = 12
    reference = [c for c in captions if len(tokenizer(c)["input_ids"]) > limit]
    assert captions.index(reference[0]) >= 2
    count, example = count_truncated_captions(tokenizer, captions, limit)
    assert 0 < count == len(reference) < len(captions)
    assert example.caption == reference[0]


def test_truncation_warning_names_key_count_example_and_fix():
    example = TruncatedCaption("a long caption about a stellate lesion", "stellate lesion")
    below = format_truncation_warning("data.train", 12, 300, example, max_text_length=5, model_max_length=77)
    assert below == (
        "warning: data.train: 12 of 300 captions are longer than 5 tokens and will be cut; "
        "e.g. 'a long caption about a stellate lesion' loses 'stellate lesion'. To keep them, raise "
        "data.max_text_length (now 5, up to the model's limit of 77) or shorten the captions."
    )
    at_limit = format_truncation_warning("data.eval.target", 1, 16, example, max_text_length=77, model_max_length=77)
    assert at_limit.startswith("warning: data.eval.target: 1 of 16 captions are longer than 77 tokens")
    assert at_limit.endswith("data.max_text_length is already the model's limit (77): shorten the captions.")
