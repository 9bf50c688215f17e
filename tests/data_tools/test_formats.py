"""Tables of image paths relative to the file, URLs refused, several caption columns, a seeded split by image."""

from __future__ import annotations

import csv
import json

import pytest

from data_tools.loading import decode_image, load_image_text_dataset
from data_tools.synthetic.domains import generate_domain
from finetune.errors import DataLoadError


@pytest.fixture()
def image_folder(tmp_path):
    cols = generate_domain("target", 10, image_size=32, seed=2)
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(cols["image"]):
        image.save(tmp_path / "imgs" / f"{i}.png")
    return tmp_path, cols


def test_csv_with_relative_paths_and_two_caption_columns(image_folder, tmp_path):
    root, cols = image_folder
    table = root / "meta.csv"
    with table.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "short", "long", "kind"])
        for i in range(10):
            writer.writerow([f"imgs/{i}.png", f"short {i}", f"long caption {i}" if i != 3 else "", cols["label"][i]])
    pairs = load_image_text_dataset(
        key="data.train", path=str(table), image_column="file", caption_column=["short", "long"], label_column="kind"
    )
    assert len(pairs) == 19  # 10 short + 9 non-empty long captions
    assert pairs["caption"][:2] == ["short 0", "long caption 0"] and pairs["image_index"][:2] == [0, 0]
    assert decode_image(pairs[0]["image"]).size == (32, 32)  # the relative path was read from the table's folder


def test_jsonl_urls_are_refused_and_a_path_column_pointing_nowhere_names_key_and_row(tmp_path):
    table = tmp_path / "rows.jsonl"
    table.write_text("\n".join(json.dumps({"image": f"https://example.com/{i}.jpg", "caption": "x"}) for i in range(3)))
    with pytest.raises(DataLoadError, match=r"data.train.image_column: row 0 holds a URL"):
        load_image_text_dataset(key="data.train", path=str(table))
    table.write_text("\n".join(json.dumps({"image": f"nowhere/{i}.png", "caption": "x"}) for i in range(3)))
    with pytest.raises(DataLoadError, match=r"data.eval.target.image_column: none of the first 3 paths exists \(row 0: 'nowhere/0.png'"):
        load_image_text_dataset(key="data.eval.target", path=str(table))


def test_seeded_split_by_image_never_puts_an_image_on_both_sides(image_folder):
    root, _ = image_folder
    table = root / "meta.jsonl"
    # two captions per image, as two rows sharing an id
    table.write_text("\n".join(json.dumps({"image": f"imgs/{i % 10}.png", "caption": f"c{i}", "id": str(i % 10)}) for i in range(20)))
    common = dict(path=str(table), image_id_column="id", split_fraction=0.3, split_seed=1)
    train = load_image_text_dataset(key="data.train", split_part="train", **common)
    held = load_image_text_dataset(key="data.eval.target", split_part="eval", **common)
    assert set(train["image_id"]).isdisjoint(held["image_id"])
    assert set(train["image_id"]) | set(held["image_id"]) == {str(i) for i in range(10)}
    assert len(train) + len(held) == 20
    again = load_image_text_dataset(key="data.eval.target", split_part="eval", **common)
    assert again["image_id"] == held["image_id"]
