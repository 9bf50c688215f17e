"""Tests for data_tools.loading: every source lands in one normal form; errors name the recipe key."""

from __future__ import annotations

import io
import socket
import sys

import datasets
import huggingface_hub.constants
import numpy as np
import pytest
from PIL import Image

from data_tools.hub import is_hub_lookup, offline_note
from data_tools.loading import (
    RetrievalSet,
    decode_image,
    load_image_text_dataset,
    quiet_datasets,
)
from data_tools.synthetic.domains import generate_domain
from finetune.errors import DataLoadError


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(ds: datasets.Dataset) -> list[bytes]:
    return [value["bytes"] for value in ds["image"]]


def runs(values) -> list[int]:
    """Lengths of runs of equal consecutive values: [0, 0, 1, 2, 2, 2] -> [2, 1, 3]."""
    out: list[int] = []
    for i, v in enumerate(values):
        if i and v == values[i - 1]:
            out[-1] += 1
        else:
            out.append(1)
    return out


# --------------------------------------------------------------------------------------------------
# (a) synthetic spec


def test_synthetic_spec_normal_form():
    spec = {"domain": "target", "num_images": 6, "captions_per_image": 3, "image_size": 32, "seed": 4}
    ds = load_image_text_dataset(key="data.train", synthetic=spec, image_id_column="image_id", label_column="label")
    assert ds.column_names == ["image", "caption", "image_index", "source_row", "image_id", "label"]
    assert len(ds) == 6 * 3  # one row per caption
    assert ds["image_index"][:] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5]
    assert ds["source_row"][:] == [i for i in range(6) for _ in range(3)]
    assert ds.features["image_index"] == datasets.Value("int64")
    assert ds.features["source_row"] == datasets.Value("int64")
    assert ds.features["image_id"] == datasets.Value("string")
    assert ds.features["label"] == datasets.Value("string")
    assert ds.features["caption"] == datasets.Value("string")
    assert isinstance(ds.features["image"], datasets.Image) and ds.features["image"].decode is False

    raw = generate_domain(**spec)
    assert ds["caption"][:] == [c for caps in raw["caption"] for c in caps]
    assert ds["label"][:] == [label for label in raw["label"] for _ in range(3)]
    assert ds["image_id"][:] == [image_id for image_id in raw["image_id"] for _ in range(3)]
    # Undecoded images; the three rows of one image carry the same bytes, different images differ.
    values = ds["image"][:]
    assert all(isinstance(v, dict) and isinstance(v["bytes"], bytes) for v in values)
    per_image = [values[3 * i]["bytes"] for i in range(6)]
    assert all(values[3 * i + k]["bytes"] == per_image[i] for i in range(6) for k in range(3))
    assert len(set(per_image)) == 6
    decoded = decode_image(values[0])
    assert decoded.size == (32, 32)
    assert np.array_equal(np.asarray(decoded), np.asarray(raw["image"][0]))


def test_synthetic_without_label_or_id_columns_uses_row_index():
    ds = load_image_text_dataset(key="data.eval.target", synthetic={"domain": "source", "num_images": 4, "captions_per_image": 2})
    assert ds.column_names == ["image", "caption", "image_index", "source_row", "image_id"]
    assert ds["image_index"][:] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds["source_row"][:] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert ds["image_id"][:] == ["0", "0", "1", "1", "2", "2", "3", "3"]  # the source row, as a string


def test_max_samples_keeps_first_rows():
    spec = {"domain": "source", "num_images": 8, "captions_per_image": 2}
    ds = load_image_text_dataset(key="data.train", synthetic=spec, max_samples=3)
    assert len(ds) == 6
    assert ds["image_index"][:] == [0, 0, 1, 1, 2, 2]
    assert ds["source_row"][:] == [0, 0, 1, 1, 2, 2]
    full = load_image_text_dataset(key="data.train", synthetic=spec, max_samples=100)
    assert len(full) == 16


# --------------------------------------------------------------------------------------------------
# (b) / (c) local stand-ins for the hub datasets


def test_roco_like_parquet_folder(roco_like_dir):
    ds = load_image_text_dataset(key="data.eval.target", path=str(roco_like_dir), split="validation", image_id_column="image_id")
    assert len(ds) == 16
    assert ds.column_names == ["image", "caption", "image_index", "source_row", "image_id"]
    assert ds["image_index"][:] == list(range(16))  # unique ids: one image per row, in order
    assert ds["image_id"][:] == [f"ROCO_validation_{i:05d}" for i in range(16)]
    assert ds["source_row"][:] == list(range(16))
    assert all(isinstance(c, str) and c for c in ds["caption"])
    assert len(set(image_bytes(ds))) == 16
    image = decode_image(ds[0]["image"])
    assert image.mode == "RGB" and image.size == (32, 32)


@pytest.mark.parametrize("split, n", [("train", 48), ("test", 16), ("validation[:5]", 5)])
def test_roco_like_splits(roco_like_dir, split, n):
    ds = load_image_text_dataset(key="data.train", path=str(roco_like_dir), split=split, image_id_column="image_id")
    assert len(ds) == n


def test_fashion_like_slices_are_disjoint(fashion_like_dir):
    kwargs = dict(
        path=str(fashion_like_dir),
        caption_column="productDisplayName",
        image_id_column="id",
        label_column="articleType",
    )
    full = load_image_text_dataset(key="data.train", split="train", **kwargs)
    head = load_image_text_dataset(key="data.train", split="train[:75%]", **kwargs)
    tail = load_image_text_dataset(key="data.eval.target", split="train[75%:]", **kwargs)
    assert (len(full), len(head), len(tail)) == (64, 48, 16)
    assert head.column_names == ["image", "caption", "image_index", "source_row", "image_id", "label"]
    # Integer ids become strings; source rows count within the loaded slice.
    assert tail["image_id"][:] == [str(10000 + 48 + i) for i in range(16)]
    assert tail["source_row"][:] == list(range(16))
    h, t, f = image_bytes(head), image_bytes(tail), image_bytes(full)
    assert set(h).isdisjoint(t)
    assert h + t == f  # the two slices partition the split, in order
    assert head["caption"][:] + tail["caption"][:] == full["caption"][:]
    assert tail["image_index"][:] == list(range(16))  # re-indexed within the slice
    assert set(full["label"]) <= {"circle", "square", "triangle", "cross", "ring", "diamond", "bar", "star"}


# --------------------------------------------------------------------------------------------------
# (d) missing columns


def test_missing_caption_column_names_key_and_lists_columns(roco_like_dir):
    with pytest.raises(DataLoadError) as info:
        load_image_text_dataset(key="data.train", path=str(roco_like_dir), split="validation", caption_column="text")
    message = str(info.value)
    assert message == (
        f"data.train.caption_column: column 'text' not in {str(roco_like_dir)!r} (split 'validation'). "
        "Columns there: image, image_id, caption"
    )


def test_several_missing_columns_are_all_reported(fashion_like_dir):
    with pytest.raises(DataLoadError) as info:
        load_image_text_dataset(
            key="data.eval.target",
            path=str(fashion_like_dir),
            caption_column="caption",
            label_column="category",
            image_id_column="id",
        )
    message = str(info.value)
    assert "data.eval.target.caption_column: column 'caption' not in" in message
    assert "; data.eval.target.label_column: column 'category' not in" in message
    assert "image_id_column" not in message  # `id` exists
    assert message.endswith(
        "Columns there: id, gender, masterCategory, subCategory, articleType, baseColour, season, year, usage, productDisplayName, image"
    )


def test_missing_column_in_synthetic_domain():
    with pytest.raises(
        DataLoadError,
        match=r"^data\.train\.image_column: column 'img' not in synthetic target domain\. "
        r"Columns there: image, caption, image_id, label$",
    ):
        load_image_text_dataset(key="data.train", synthetic={"domain": "target", "num_images": 2}, image_column="img")


# --------------------------------------------------------------------------------------------------
# (e) unreachable hub id, offline


@pytest.fixture
def offline(monkeypatch):
    """Offline for real: the env vars for the message, the already-imported constants for the libraries,
    and no DNS at all, so nothing can wait on the network."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True, raising=False)

    def no_network(*args, **kwargs):
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)


def test_unknown_hub_id_offline_names_key_and_says_offline(offline):
    with pytest.raises(DataLoadError) as info:
        load_image_text_dataset(key="data.eval.target", path="nobody-xyz/no-such-dataset-123", split="validation")
    message = str(info.value)
    assert message.startswith("data.eval.target.path: could not load dataset 'nobody-xyz/no-such-dataset-123' (split 'validation'): ")
    assert "The machine is offline (HF_HUB_OFFLINE is set)" in message
    assert isinstance(info.value.__cause__, Exception)


def test_bad_split_names_the_key(roco_like_dir):
    with pytest.raises(DataLoadError, match=r"^data\.train\.path: could not load dataset .* \(split 'nosuch'\): "):
        load_image_text_dataset(key="data.train", path=str(roco_like_dir), split="nosuch")


def test_missing_split_of_a_local_folder_offline_has_no_offline_note(offline, roco_like_dir):
    with pytest.raises(DataLoadError) as info:
        load_image_text_dataset(key="data.train", path=str(roco_like_dir), split="nosuch")
    message = str(info.value)
    assert message.startswith(f"data.train.path: could not load dataset {str(roco_like_dir)!r} (split 'nosuch'): ")
    assert "offline" not in message


def test_offline_note_only_for_hub_lookups(offline, roco_like_dir, tmp_path):
    sentence = " The machine is offline (HF_HUB_OFFLINE is set): only local folders and the cache can be used."
    assert offline_note("openai/clip-vit-base-patch16") == sentence
    assert offline_note("mnist") == sentence  # a canonical hub id has no slash
    assert offline_note() == sentence  # unknown source: assume the hub
    assert offline_note("parquet", {"train": "hf://datasets/org/name/train.parquet"}) == sentence
    assert offline_note(str(roco_like_dir)) == ""  # an existing folder
    assert offline_note(str(tmp_path / "not-there")) == ""  # an absolute path cannot be a repo id
    assert offline_note("./relative/missing") == ""
    assert offline_note("parquet", {"train": str(tmp_path / "x.parquet")}) == ""  # a builder on local files
    assert offline_note("csv", [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]) == ""
    assert is_hub_lookup("org/name") and not is_hub_lookup("imagefolder", str(tmp_path))


def test_no_offline_note_when_online(monkeypatch, roco_like_dir):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(DataLoadError) as info:
        load_image_text_dataset(key="data.train", path=str(roco_like_dir), split="nosuch")
    assert "offline" not in str(info.value)


# --------------------------------------------------------------------------------------------------
# (f) decode_image


def test_decode_image_corrupt_bytes_is_none():
    assert decode_image(b"definitely not an image") is None
    assert decode_image({"bytes": b"\x89PNG\r\n\x1a\n garbage", "path": None}) is None
    good = png_bytes(Image.new("RGB", (16, 16), (10, 20, 30)))
    assert decode_image(good[: len(good) // 2]) is None  # truncated file


def test_decode_image_good_png_is_rgb():
    rgba = Image.new("RGBA", (5, 3), (200, 100, 50, 128))
    for value in (png_bytes(rgba), {"bytes": png_bytes(rgba), "path": None}, rgba):
        image = decode_image(value)
        assert isinstance(image, Image.Image)
        assert image.mode == "RGB" and image.size == (5, 3)
        assert image.getpixel((0, 0)) == (200, 100, 50)


def test_decode_image_grayscale_becomes_rgb():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, mode="L")
    image = decode_image(png_bytes(gray))
    assert image.mode == "RGB" and image.size == (4, 3)
    arr = np.asarray(image)
    assert arr.shape == (3, 4, 3)
    assert np.array_equal(arr[..., 0], np.asarray(gray)) and np.array_equal(arr[..., 1], arr[..., 2])


def test_decode_image_from_paths(tmp_path):
    path = tmp_path / "x.png"
    Image.new("L", (7, 2), 99).save(path)
    assert decode_image(str(path)).getpixel((0, 0)) == (99, 99, 99)
    assert decode_image(path).size == (7, 2)
    assert decode_image({"bytes": None, "path": str(path)}).mode == "RGB"
    assert decode_image(str(tmp_path / "missing.png")) is None
    (tmp_path / "bad.png").write_bytes(b"nope")
    assert decode_image({"bytes": None, "path": str(tmp_path / "bad.png")}) is None
    assert decode_image(12345) is None


# --------------------------------------------------------------------------------------------------
# (g) RetrievalSet


def test_retrieval_set_hand_checked():
    # 3 images; image ids deliberately not in sorted order of first appearance.
    pairs = datasets.Dataset.from_dict(
        {
            "image": ["img5", "img5", "img2", "img7", "img2", "img7", "img7"],
            "caption": ["a", "b", "c", "d", "e", "f", "g"],
            "image_index": [5, 5, 2, 7, 2, 7, 7],
            "source_row": [50, 50, 20, 70, 20, 70, 70],
            "image_id": ["id5", "id5", "id2", "id7", "id2", "id7", "id7"],
            "label": ["cat", "cat", "dog", "cat", "dog", "cat", "cat"],
        }
    )
    rset = RetrievalSet.from_pairs(pairs)
    assert list(rset.images) == ["img5", "img2", "img7"]  # first-appearance order
    assert rset.num_images == len(rset.images) == 3
    assert rset.image_rows.tolist() == [0, 2, 3]  # rows of `pairs`, not copies of the images
    assert rset.pairs is pairs
    assert rset.image_ids == ["id5", "id2", "id7"]
    assert rset.source_rows.tolist() == [50, 20, 70]
    assert rset.labels == ["cat", "dog", "cat"]
    assert rset.captions == ["a", "b", "c", "d", "e", "f", "g"]
    assert rset.text_to_image.dtype == np.int64
    assert rset.text_to_image.tolist() == [0, 0, 1, 2, 1, 2, 2]
    assert all(rset.images[j] == pairs[i]["image"] for i, j in enumerate(rset.text_to_image))


def test_retrieval_set_without_labels_and_with_missing_columns():
    pairs = datasets.Dataset.from_dict(
        {"image": ["x", "y"], "caption": ["a", "b"], "image_index": [0, 1], "source_row": [0, 1], "image_id": ["0", "1"]}
    )
    assert RetrievalSet.from_pairs(pairs).labels is None
    with pytest.raises(DataLoadError, match=r"missing source_row, image_id \(load it with load_image_text_dataset\)$"):
        RetrievalSet.from_pairs(pairs.remove_columns(["source_row", "image_id"]))


def test_retrieval_set_from_loaded_multicaption_dataset():
    ds = load_image_text_dataset(
        key="data.eval.target", synthetic={"domain": "target", "num_images": 5, "captions_per_image": 2, "seed": 1}
    )
    rset = RetrievalSet.from_pairs(ds)
    assert len(rset.images) == 5
    assert len(rset.captions) == 10 and rset.captions == ds["caption"][:]
    assert rset.text_to_image.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert rset.image_ids == ["0", "1", "2", "3", "4"] and rset.source_rows.tolist() == [0, 1, 2, 3, 4]
    assert rset.labels is None
    assert [im["bytes"] for im in rset.images] == [ds[2 * i]["image"]["bytes"] for i in range(5)]
    assert len({im["bytes"] for im in rset.images}) == 5


# --------------------------------------------------------------------------------------------------
# (h) list captions, empty captions


def write_parquet(path, images, captions, features_caption) -> str:
    ds = datasets.Dataset.from_dict(
        {"image": images, "caption": captions},
        features=datasets.Features({"image": datasets.Image(), "caption": features_caption}),
    )
    ds.to_parquet(str(path))
    return str(path)


@pytest.fixture
def four_images():
    return [Image.new("RGB", (8, 8), (40 * i, 10, 10)) for i in range(4)]


def test_list_captions_are_exploded_and_empty_ones_dropped(tmp_path, four_images):
    file = write_parquet(
        tmp_path / "lists.parquet",
        four_images,
        [["red one", "  ", "red two", None], ["", "   "], None, ["blue"]],
        datasets.List(datasets.Value("string")),
    )
    ds = load_image_text_dataset(key="data.train", path="parquet", data_files={"train": file})
    assert ds["caption"][:] == ["red one", "red two", "blue"]
    idx = ds["image_index"][:]
    assert idx[0] == idx[1] != idx[2]
    imgs = [decode_image(v).getpixel((0, 0)) for v in ds["image"]]
    assert imgs == [(0, 10, 10), (0, 10, 10), (120, 10, 10)]
    # Rows 1 and 2 had no usable caption: the survivors still point at their own source rows.
    assert ds["source_row"][:] == [0, 0, 3] and ds["image_id"][:] == ["0", "0", "3"]
    rset = RetrievalSet.from_pairs(ds)
    assert len(rset.images) == 2 and rset.text_to_image.tolist() == [0, 0, 1]
    assert rset.source_rows.tolist() == [0, 3] and rset.image_ids == ["0", "3"]


def test_empty_string_captions_are_dropped(tmp_path, four_images):
    file = write_parquet(tmp_path / "strings.parquet", four_images, ["first", "", "   ", "fourth"], datasets.Value("string"))
    ds = load_image_text_dataset(key="data.train", path="parquet", data_files={"train": file})
    assert ds["caption"][:] == ["first", "fourth"]
    assert len(set(ds["image_index"])) == 2


def test_all_captions_empty_raises(tmp_path, four_images):
    file = write_parquet(tmp_path / "empty.parquet", four_images[:2], ["", " "], datasets.Value("string"))
    with pytest.raises(DataLoadError, match=r"^data\.eval\.target: no \(image, caption\) rows in 'parquet' \(split 'train'\)$"):
        load_image_text_dataset(key="data.eval.target", path="parquet", data_files={"train": file})


def test_shared_image_ids_group_rows(tmp_path, four_images):
    # Flickr/COCO style: one row per caption, rows of one image share an id (not adjacent here).
    ds = datasets.Dataset.from_dict(
        {
            "image": [four_images[0], four_images[1], four_images[0], four_images[2], four_images[1]],
            "caption": ["a0", "b0", "a1", "c0", "b1"],
            "img_id": ["z", "y", "z", "x", "y"],
        },
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string"), "img_id": datasets.Value("string")}),
    )
    ds.to_parquet(str(tmp_path / "grouped.parquet"))
    out = load_image_text_dataset(
        key="data.train", path="parquet", data_files={"train": str(tmp_path / "grouped.parquet")}, image_id_column="img_id"
    )
    # Ids factorized in order of first appearance: z -> 0, y -> 1, x -> 2.
    assert out["image_index"][:] == [0, 1, 0, 2, 1]
    assert out["image_id"][:] == ["z", "y", "z", "x", "y"]
    assert out["source_row"][:] == [0, 1, 2, 3, 4]
    assert runs(sorted(out["image_index"][:])) == [2, 2, 1]
    rset = RetrievalSet.from_pairs(out)
    assert len(rset.images) == 3 and rset.text_to_image.tolist() == [0, 1, 0, 2, 1]
    assert [decode_image(v).getpixel((0, 0))[0] for v in rset.images] == [0, 40, 80]
    assert rset.image_ids == ["z", "y", "x"] and rset.source_rows.tolist() == [0, 1, 3]


# --------------------------------------------------------------------------------------------------
# (i) local and synthetic loads print only the toolkit's lines


def test_local_and_synthetic_loads_are_quiet_and_restore_datasets_state(tmp_path, four_images, capfd):
    file = write_parquet(tmp_path / "quiet.parquet", four_images, ["a", "b", "c", "d"], datasets.Value("string"))
    capfd.readouterr()
    bars_before = datasets.utils.are_progress_bars_disabled()
    verbosity_before = datasets.logging.get_verbosity()
    load_image_text_dataset(key="data.train", path="parquet", data_files={"train": file})
    load_image_text_dataset(key="data.train", synthetic={"domain": "source", "num_images": 3})
    printed = capfd.readouterr()
    assert printed.out == "" and printed.err == ""  # no "Generating train split", no map bars
    assert datasets.utils.are_progress_bars_disabled() == bars_before
    assert datasets.logging.get_verbosity() == verbosity_before


def test_quiet_datasets_restores_state_after_an_error(monkeypatch):
    # No HF_DATASETS_DISABLE_PROGRESS_BARS override from the environment, whatever the machine has.
    monkeypatch.setattr(sys.modules["datasets.utils.tqdm"], "HF_DATASETS_DISABLE_PROGRESS_BARS", None)
    verbosity = datasets.logging.get_verbosity()
    bars_disabled = datasets.utils.are_progress_bars_disabled()
    datasets.logging.set_verbosity_info()
    datasets.utils.enable_progress_bars()
    try:
        with pytest.raises(DataLoadError):
            with quiet_datasets():
                assert datasets.utils.are_progress_bars_disabled()
                assert datasets.logging.get_verbosity() == datasets.logging.ERROR
                raise DataLoadError("boom")
        assert datasets.logging.get_verbosity() == datasets.logging.INFO
        assert not datasets.utils.are_progress_bars_disabled()
        with quiet_datasets(enabled=False):  # hub downloads keep their bars
            assert not datasets.utils.are_progress_bars_disabled()
    finally:
        datasets.logging.set_verbosity(verbosity)
        if bars_disabled:
            datasets.utils.disable_progress_bars()
