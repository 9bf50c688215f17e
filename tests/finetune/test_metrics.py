"""Tests for finetune.metrics: hand-computed retrieval ranks, chunking, validation and reporting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from finetune.metrics import format_results_table, retrieval_metrics, write_results

# --------------------------------------------------------------------------------------------------
# Hand-computed multi-caption example: 3 images, 5 captions, 2-D embeddings.
#
# Images (unit):  img0 = (1, 0)   img1 = (0, 1)   img2 = (-1, 0)
# Captions (raw, normalised inside) and their images (text_to_image = [0, 0, 1, 1, 2]):
#   c0 = (0.2, 1)  -> img0     unit ( 0.196, 0.981)
#   c1 = (1, 0.1)  -> img0     unit ( 0.995, 0.100)
#   c2 = (1, 0.5)  -> img1     unit ( 0.894, 0.447)
#   c3 = (-1, 0.2) -> img1     unit (-0.981, 0.196)
#   c4 = (0.3, 1)  -> img2     unit ( 0.287, 0.958)
#
# cos(img, caption): img0 row = x-coords, img1 row = y-coords, img2 row = -x-coords.
#            c0      c1      c2      c3      c4
#   img0   0.196   0.995   0.894  -0.981   0.287
#   img1   0.981   0.100   0.447   0.196   0.958
#   img2  -0.196  -0.995  -0.894   0.981  -0.287
#
# t2i (column = query; count images strictly above own image):
#   c0 own img0 0.196 < img1 0.981          -> rank 2
#   c1 own img0 0.995 is the max            -> rank 1
#   c2 own img1 0.447 < img0 0.894          -> rank 2
#   c3 own img1 0.196 < img2 0.981          -> rank 2
#   c4 own img2 -0.287 < img0 0.287, img1   -> rank 3
#   ranks [2, 1, 2, 2, 3]: R@1 20, R@2 80, R@3 100, mean 2.0, median 2.0
#
# i2t (row = query; count captions strictly above the best own caption):
#   img0 own c0 0.196, c1 0.995 -> best is the SECOND caption c1, nothing above -> rank 1
#        (with only its first caption c0 it would be rank 4: c1, c2, c4 are above)
#   img1 own c2 0.447, c3 0.196 -> best c2; above: c0 0.981, c4 0.958        -> rank 3
#   img2 own c4 -0.287          -> above: c0 -0.196, c3 0.981                -> rank 3
#   ranks [1, 3, 3]: R@1 33.33, R@2 33.33, R@3 100, mean 7/3, median 3.0
# --------------------------------------------------------------------------------------------------

IMAGES = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
TEXTS = torch.tensor([[0.2, 1.0], [1.0, 0.1], [1.0, 0.5], [-1.0, 0.2], [0.3, 1.0]])
TEXT_TO_IMAGE = torch.tensor([0, 0, 1, 1, 2])


def test_hand_computed_default_ks() -> None:
    res = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE)
    assert set(res) == {"t2i", "i2t"}
    assert res["t2i"] == pytest.approx(
        {"R@1": 20.0, "R@5": 100.0, "R@10": 100.0, "mean_rank": 2.0, "median_rank": 2.0}
    )
    assert res["i2t"] == pytest.approx(
        {"R@1": 100.0 / 3, "R@5": 100.0, "R@10": 100.0, "mean_rank": 7.0 / 3, "median_rank": 3.0}
    )
    for direction in res.values():
        assert all(type(v) is float for v in direction.values())


def test_hand_computed_custom_ks() -> None:
    res = retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=(1, 2, 3))
    assert set(res["t2i"]) == {"R@1", "R@2", "R@3", "mean_rank", "median_rank"}
    assert res["t2i"]["R@2"] == pytest.approx(80.0)
    assert res["t2i"]["R@3"] == pytest.approx(100.0)
    assert res["i2t"]["R@1"] == pytest.approx(100.0 / 3)
    assert res["i2t"]["R@2"] == pytest.approx(100.0 / 3)
    assert res["i2t"]["R@3"] == pytest.approx(100.0)


def test_i2t_uses_best_caption_not_first() -> None:
    # Only img0's caption order matters here: swapping c0/c1 must not change img0's rank (1),
    # while dropping c1 (its best caption) makes img0 rank 4 -> R@1 falls to 0.
    swapped = retrieval_metrics(IMAGES, TEXTS[[1, 0, 2, 3, 4]], TEXT_TO_IMAGE)
    assert swapped["i2t"]["R@1"] == pytest.approx(100.0 / 3)
    dropped = retrieval_metrics(IMAGES, TEXTS[[0, 2, 3, 4]], torch.tensor([0, 1, 1, 2]))
    # img0: c2 0.894, c4 0.287 above c0 0.196 -> 3; img1 and img2 stay at rank 3.
    assert dropped["i2t"]["R@1"] == 0.0
    assert dropped["i2t"]["mean_rank"] == pytest.approx(3.0)


def test_median_averages_two_middle_ranks() -> None:
    # 2 images, 2 captions: caption 0 is a hit (rank 1), caption 1 points at image 0 (rank 2).
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.2]])
    res = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert res["t2i"]["median_rank"] == 1.5  # torch.median would give 1.0
    assert res["t2i"]["mean_rank"] == 1.5
    assert res["t2i"]["R@1"] == 50.0


def test_ties_count_in_favour_of_query() -> None:
    # Two identical images: neither scores strictly higher than the other, so both rank 1.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    res = retrieval_metrics(images, texts, torch.tensor([0, 1]))
    assert res["t2i"]["R@1"] == 100.0
    assert res["i2t"]["R@1"] == 100.0


def _reference(image_emb, text_emb, text_to_image, ks):
    """Brute force in float64 with Python loops, independent of the vectorised code."""
    img = image_emb.double() / image_emb.double().norm(dim=1, keepdim=True)
    txt = text_emb.double() / text_emb.double().norm(dim=1, keepdim=True)
    sim = (txt @ img.T).numpy()  # (N_txt, N_img)
    t2i = [1 + int((sim[c] > sim[c, int(text_to_image[c])]).sum()) for c in range(len(txt))]
    i2t = []
    for i in range(len(img)):
        own = [c for c in range(len(txt)) if int(text_to_image[c]) == i]
        best = max(sim[c, i] for c in own)
        i2t.append(1 + int((sim[:, i] > best).sum()))

    def summary(r):
        r = np.array(r)
        out = {f"R@{k}": 100.0 * float(np.mean(r <= k)) for k in ks}
        out.update(mean_rank=float(r.mean()), median_rank=float(np.median(r)))
        return out

    return {"t2i": summary(t2i), "i2t": summary(i2t)}


@pytest.fixture
def random_problem():
    gen = torch.Generator().manual_seed(0)
    n_img, n_txt, dim = 37, 101, 8
    images = torch.randn(n_img, dim, generator=gen)
    # Every image gets >= 1 caption, the rest are assigned at random.
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=gen)])
    t2i = t2i[torch.randperm(n_txt, generator=gen)]
    texts = images[t2i] + 1.5 * torch.randn(n_txt, dim, generator=gen)
    return images, texts, t2i


def test_matches_brute_force_reference(random_problem) -> None:
    images, texts, t2i = random_problem
    ks = (1, 3, 5, 10)
    res = retrieval_metrics(images, texts, t2i, ks=ks)
    ref = _reference(images, texts, t2i, ks)
    assert res["t2i"] == pytest.approx(ref["t2i"])
    assert res["i2t"] == pytest.approx(ref["i2t"])
    assert 0.0 < res["t2i"]["R@1"] < 100.0  # a non-degenerate problem


@pytest.mark.parametrize("chunk_size", [1, 2, 7, 36, 37, 100])
def test_chunking_is_identical_to_one_chunk(random_problem, chunk_size: int) -> None:
    images, texts, t2i = random_problem
    one_chunk = retrieval_metrics(images, texts, t2i, chunk_size=10_000)
    assert retrieval_metrics(images, texts, t2i, chunk_size=chunk_size) == one_chunk


def test_scaling_embeddings_changes_nothing(random_problem) -> None:
    images, texts, t2i = random_problem
    gen = torch.Generator().manual_seed(1)
    img_scale = torch.rand(images.shape[0], 1, generator=gen) * 50 + 0.01  # (N_img, 1)
    txt_scale = torch.rand(texts.shape[0], 1, generator=gen) * 50 + 0.01  # (N_txt, 1)
    base = retrieval_metrics(images, texts, t2i)
    scaled = retrieval_metrics(images * img_scale, (texts * txt_scale).double(), t2i)
    assert scaled == base


def test_accepts_grad_and_half_inputs() -> None:
    images = IMAGES.clone().requires_grad_(True)
    res = retrieval_metrics(images, TEXTS.half(), TEXT_TO_IMAGE.int())
    assert res["t2i"]["R@1"] == pytest.approx(20.0)


@pytest.mark.parametrize(
    ("images", "texts", "t2i", "match"),
    [
        (IMAGES, torch.zeros(5, 3), TEXT_TO_IMAGE, r"D=2.*D=3"),
        (IMAGES[0], TEXTS, TEXT_TO_IMAGE, r"image_emb must be 2-D"),
        (IMAGES, TEXTS, torch.tensor([0, 0, 1, 2]), r"text_to_image must have shape \(N_txt,\) = \(5,\)"),
        (IMAGES, TEXTS, TEXT_TO_IMAGE[None], r"text_to_image must have shape"),
        (IMAGES, TEXTS, torch.tensor([0, 0, 1, 1, 3]), r"must be in \[0, 2\].*\[0, 3\]"),
        (IMAGES, TEXTS, torch.tensor([0, -1, 1, 1, 2]), r"must be in \[0, 2\]"),
        (IMAGES, TEXTS, TEXT_TO_IMAGE.float(), r"integer indices"),
        (IMAGES, TEXTS[:0], TEXT_TO_IMAGE[:0], r"text_emb is empty"),
    ],
)
def test_bad_shapes_raise(images, texts, t2i, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        retrieval_metrics(images, texts, t2i)


def test_image_without_caption_raises_with_count() -> None:
    images = torch.cat([IMAGES, torch.tensor([[0.0, -1.0], [1.0, 1.0]])])  # 5 images
    with pytest.raises(ValueError, match=r"^2 image\(s\) have no caption.*first: index 3"):
        retrieval_metrics(images, TEXTS, TEXT_TO_IMAGE)


@pytest.mark.parametrize("ks", [(), (0,), (1, -5), (1.5,)])
def test_bad_ks_raise(ks) -> None:
    with pytest.raises(ValueError, match="ks"):
        retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, ks=ks)


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------

RESULTS = {
    "zero_shot": {
        "target": {
            "t2i": {"R@1": 10.0, "R@5": 30.25, "mean_rank": 12.0, "median_rank": 4.0},
            "i2t": {"R@1": 12.5, "R@5": 40.0, "mean_rank": 9.0, "median_rank": 3.0},
        },
        "source": {
            "t2i": {"R@1": 50.0, "R@5": 80.0, "mean_rank": 2.0, "median_rank": 1.0},
        },
    },
    "adapted": {
        "target": {
            "t2i": {"R@1": 33.5, "R@5": 60.0, "mean_rank": 5.25, "median_rank": 2.0},
            "i2t": {"R@1": 40.0, "R@5": 70.0, "mean_rank": 4.0, "median_rank": 1.5},
        },
    },
}


def _rows(table: str) -> dict[tuple[str, str, str], list[str]]:
    """(set, direction, metric) -> [zero-shot, adapted, delta] cells, skipping header and rule."""
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")] == [
        "set", "direction", "metric", "zero-shot", "adapted", "delta"
    ]
    assert set(lines[1]) <= set("|-: ")
    out = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 6, line
        out[tuple(cells[:3])] = cells[3:]
    return out


def test_format_results_table_values_and_deltas() -> None:
    table = format_results_table(RESULTS)
    rows = _rows(table)
    assert rows[("target", "t2i", "R@1")] == ["10.00", "33.50", "+23.50"]
    assert rows[("target", "t2i", "R@5")] == ["30.25", "60.00", "+29.75"]
    assert rows[("target", "t2i", "mean_rank")] == ["12.00", "5.25", "-6.75"]
    assert rows[("target", "i2t", "median_rank")] == ["3.00", "1.50", "-1.50"]
    # source exists only for zero-shot: adapted and delta are "-".
    assert rows[("source", "t2i", "R@1")] == ["50.00", "-", "-"]
    assert ("source", "i2t", "R@1") not in rows
    assert len(rows) == 12
    # target before source, t2i before i2t, R@K before ranks.
    keys = list(rows)
    assert keys[0] == ("target", "t2i", "R@1") and keys[-1][0] == "source"
    assert keys.index(("target", "t2i", "R@5")) < keys.index(("target", "t2i", "mean_rank"))
    # Columns are padded to equal width so it reads on a console too.
    assert len({len(line) for line in table.splitlines()}) == 1


def test_format_results_table_missing_zero_shot_side() -> None:
    rows = _rows(format_results_table({"adapted": RESULTS["adapted"]}))
    assert rows[("target", "i2t", "R@1")] == ["-", "40.00", "-"]


def test_format_results_table_rejects_unknown_side() -> None:
    with pytest.raises(ValueError, match="zeroshot"):
        format_results_table({"zeroshot": RESULTS["zero_shot"]})


def test_write_results_creates_three_files(tmp_path) -> None:
    out_dir = tmp_path / "nested" / "run"
    paths = write_results(RESULTS, str(out_dir))  # str accepted as well as Path

    assert set(paths) == {"json", "md", "png"}
    assert paths == {
        "json": out_dir / "results.json",
        "md": out_dir / "results.md",
        "png": out_dir / "results.png",
    }
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.json", "results.md", "results.png"]

    assert json.loads(paths["json"].read_text()) == RESULTS

    md = paths["md"].read_text()
    assert md.startswith("# Retrieval: zero-shot vs adapted\n")
    assert "top K" in md
    assert format_results_table(RESULTS) in md
    assert "+23.50" in md

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(png) > 10_000
