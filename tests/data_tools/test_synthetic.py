"""Tests for data_tools.synthetic.domains: determinism, and that target differs from source like a real shift."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from data_tools.synthetic.domains import (
    COLORS,
    SHAPES,
    TARGET_COLOR_WORDS,
    TARGET_SHAPE_WORDS,
    all_caption_text,
    generate_domain,
    sample_concepts,
)

N = 40  # images per generated domain: enough for statistics, fast to render


def words(captions: list[list[str]]) -> set[str]:
    return {w for per_image in captions for c in per_image for w in re.findall(r"[a-z]+", c)}


def pixel_bytes(images: list[Image.Image]) -> list[bytes]:
    return [np.asarray(im).tobytes() for im in images]


@pytest.fixture(scope="module")
def source():
    return generate_domain("source", N, captions_per_image=3, image_size=32, seed=0)


@pytest.fixture(scope="module")
def target():
    return generate_domain("target", N, captions_per_image=3, image_size=32, seed=0)


# --------------------------------------------------------------------------------------------------
# determinism


@pytest.mark.parametrize("domain", ["source", "target"])
def test_same_seed_same_dataset(domain):
    a = generate_domain(domain, 12, captions_per_image=2, image_size=24, seed=7)
    b = generate_domain(domain, 12, captions_per_image=2, image_size=24, seed=7)
    assert pixel_bytes(a["image"]) == pixel_bytes(b["image"])
    assert a["caption"] == b["caption"]
    assert a["label"] == b["label"]
    assert a["image_id"] == b["image_id"]


@pytest.mark.parametrize("domain", ["source", "target"])
def test_different_seed_different_dataset(domain):
    a = generate_domain(domain, 12, image_size=24, seed=0)
    b = generate_domain(domain, 12, image_size=24, seed=1)
    # Every image differs (noise, jitter), and the concept draws differ too.
    assert all(x != y for x, y in zip(pixel_bytes(a["image"]), pixel_bytes(b["image"])))
    assert a["caption"] != b["caption"]
    assert set(a["image_id"]).isdisjoint(b["image_id"])


def test_source_and_target_with_same_seed_are_different_draws():
    s = generate_domain("source", 30, seed=0)
    t = generate_domain("target", 30, seed=0)
    assert s["label"] != t["label"]


def test_columns_ids_and_labels(source):
    assert set(source) == {"image", "caption", "image_id", "label"}
    assert all(len(column) == N for column in source.values())
    assert source["image_id"][:2] == ["source-0-000000", "source-0-000001"]
    assert len(set(source["image_id"])) == N
    assert set(source["label"]) <= set(SHAPES)


def test_image_size_and_captions_per_image_respected():
    out = generate_domain("target", 5, captions_per_image=4, image_size=48, seed=3)
    assert [im.size for im in out["image"]] == [(48, 48)] * 5
    assert {im.mode for im in out["image"]} == {"RGB"}
    assert [len(c) for c in out["caption"]] == [4] * 5
    # Paraphrases of one image: consecutive templates, so the first 3 are all different.
    assert all(len(set(c[:3])) == 3 for c in out["caption"])
    # With 4 captions and 3 templates the 4th repeats the 1st.
    assert all(c[3] == c[0] for c in out["caption"])


def test_captions_describe_the_label(source, target):
    for label, captions in zip(source["label"], source["caption"]):
        assert all(label in c for c in captions)
    for label, captions in zip(target["label"], target["caption"]):
        assert all(TARGET_SHAPE_WORDS[label] in c for c in captions)


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match=r"domain must be 'source' or 'target', got 'other'"):
        generate_domain("other", 2)


# --------------------------------------------------------------------------------------------------
# the shift: visual statistics


def test_target_is_much_darker_than_source(source, target):
    src = np.array([np.asarray(im, dtype=np.float64).mean() for im in source["image"]])
    tgt = np.array([np.asarray(im, dtype=np.float64).mean() for im in target["image"]])
    assert src.mean() > 180 and tgt.mean() < 100
    assert src.mean() > 2.5 * tgt.mean()
    assert tgt.max() < src.min()  # not just on average: every target image is darker


def test_target_background_is_noisy_source_background_is_flat(source, target):
    def border_roughness(images):
        # Mean absolute difference between horizontally adjacent pixels in the top and bottom rows.
        out = []
        for im in images:
            a = np.asarray(im, dtype=np.float64)
            rows = np.concatenate([a[:1], a[-1:]])
            out.append(np.abs(np.diff(rows, axis=1)).mean())
        return float(np.median(out))

    assert border_roughness(source["image"]) < 1.0
    assert border_roughness(target["image"]) > 3.0


def test_target_palette_is_desaturated(source, target):
    def saturation(images):
        a = np.stack([np.asarray(im, dtype=np.float64) for im in images])
        return float((a.max(-1) - a.min(-1)).max(axis=(1, 2)).mean())  # most saturated pixel per image

    assert saturation(source["image"]) > 1.5 * saturation(target["image"])


# --------------------------------------------------------------------------------------------------
# the shift: vocabulary


def test_target_vocabulary_differs_from_source(source, target):
    src, tgt = words(source["caption"]), words(target["caption"])
    only_target = tgt - src
    assert {"opacity", "tint", "lesion", "finding"} & only_target
    # The target's colour words never occur in source captions, the source's colours never in target.
    assert not set(TARGET_COLOR_WORDS.values()) & src
    assert set(TARGET_COLOR_WORDS.values()) & tgt
    assert not set(COLORS) & tgt
    assert set(COLORS) & src
    # Some words are shared (the shift is partial).
    assert {"small", "large", "left", "right"} & src & tgt


def test_crimson_appears_only_in_target():
    s = generate_domain("source", 40, seed=5)
    t = generate_domain("target", 40, seed=5)
    assert any("crimson" in c for caps in t["caption"] for c in caps)
    assert not any("crimson" in c for caps in s["caption"] for c in caps)
    assert any(" red " in f" {c} " for caps in s["caption"] for c in caps)


def test_all_caption_text_covers_both_vocabularies():
    texts = all_caption_text(per_domain=50)
    assert len(texts) == 2 * 50 * 3
    vocabulary = {w for t in texts for w in re.findall(r"[a-z]+", t)}
    assert {"crimson", "circle", "opacity", "photo"} <= vocabulary


# --------------------------------------------------------------------------------------------------
# the shift: class frequencies


def shape_counts(domain: str, n: int = 3000, seed: int = 0) -> Counter:
    counts = Counter(s.shape for s in sample_concepts(domain, n, np.random.default_rng(seed)))
    assert set(counts) == set(SHAPES)  # every class occurs, even the rarest
    return counts


@pytest.mark.parametrize("seed", [0, 1])
def test_target_shapes_are_long_tailed(seed):
    counts = shape_counts("target", seed=seed)
    assert max(counts.values()) > 3 * min(counts.values())
    assert counts.most_common(1)[0][0] == "circle"  # the head class is the first one
    assert counts["circle"] > 0.25 * 3000


@pytest.mark.parametrize("seed", [0, 1])
def test_source_shapes_are_roughly_uniform(seed):
    counts = shape_counts("source", seed=seed)
    assert max(counts.values()) < 1.4 * min(counts.values())
    assert all(abs(c - 3000 / len(SHAPES)) < 60 for c in counts.values())
