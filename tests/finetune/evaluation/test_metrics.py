"""Tests for finetune.evaluation.metrics: hand-computed ranks, a top-k reference, exact ties, chunking, validation."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import finetune.evaluation.report
from finetune.evaluation.metrics import (
    DEFAULT_CHUNK_BYTES,
    QueryRanks,
    _rows_per_chunk,
    duplicate_caption_texts,
    format_results_table,
    retrieval_metrics,
    retrieval_ranks,
    write_results,
)

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
    assert res["t2i"] == pytest.approx({"R@1": 20.0, "R@5": 100.0, "R@10": 100.0, "mean_rank": 2.0, "median_rank": 2.0})
    assert res["i2t"] == pytest.approx({"R@1": 100.0 / 3, "R@5": 100.0, "R@10": 100.0, "mean_rank": 7.0 / 3, "median_rank": 3.0})
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


def test_hand_computed_per_query_ranks() -> None:
    ranks = retrieval_ranks(IMAGES, TEXTS, TEXT_TO_IMAGE)
    t2i, i2t = ranks["t2i"], ranks["i2t"]
    assert t2i.better.tolist() == [1, 0, 1, 1, 2]  # ranks [2, 1, 2, 2, 3] above
    assert i2t.better.tolist() == [0, 2, 2]  # ranks [1, 3, 3]
    for r in (t2i, i2t):
        assert r.tied.tolist() == [0] * len(r.better)
        assert r.tied_own.tolist() == [1] * len(r.better)
        assert r.better.dtype == torch.long and r.expected_rank().dtype == torch.float64
    # own_score: the caption's own image score, and each image's best own caption score.
    unit = TEXTS / TEXTS.norm(dim=1, keepdim=True)
    assert t2i.own_score.tolist() == pytest.approx([0.196, 0.995, 0.447, 0.196, -0.287], abs=1e-3)
    assert i2t.own_score.tolist() == pytest.approx([float(unit[1, 0]), float(unit[2, 1]), float(-unit[4, 0])])
    assert t2i.expected_rank().tolist() == [2.0, 1.0, 2.0, 2.0, 3.0]
    assert t2i.hit_probability(2).tolist() == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_exact_tie_is_half_a_hit() -> None:
    # Two identical images with identical captions: each query is tied with one other candidate
    # for the top slot, so it is a hit at R@1 in half of the tie orders and ranks 1.5 on average.
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    res = retrieval_metrics(images, texts, torch.tensor([0, 1]), ks=(1, 2))
    for direction in ("t2i", "i2t"):
        assert res[direction] == {"R@1": 50.0, "R@2": 100.0, "mean_rank": 1.5, "median_rank": 1.5}
    ranks = retrieval_ranks(images, texts, torch.tensor([0, 1]))
    assert ranks["i2t"].better.tolist() == [0, 0] and ranks["i2t"].tied.tolist() == [1, 1]


def test_hit_probability_formula_by_hand() -> None:
    # better b = 1, t = 3 others and m = 2 own candidates tied behind it.
    r = QueryRanks(better=torch.tensor([1]), tied=torch.tensor([3]), tied_own=torch.tensor([2]), own_score=torch.tensor([0.5]))
    # K=1: no slot left -> 0. K=2: one slot among 5 tied, 2 own -> 2/5.
    # K=3: two slots: miss = C(3,2)/C(5,2) = 3/10 -> 0.7. K=4: miss = C(3,3)/C(5,3) = 1/10 -> 0.9.
    # K=5: more slots than tied others -> 1.
    got = [float(r.hit_probability(k)[0]) for k in (1, 2, 3, 4, 5)]
    assert got == pytest.approx([0.0, 0.4, 0.7, 0.9, 1.0], abs=1e-15)
    assert float(r.expected_rank()[0]) == 1 + 1 + 3 / 3
    with pytest.raises(ValueError, match="k must be a positive int, got 0"):
        r.hit_probability(0)


def _strict_reference(image_emb, text_emb, text_to_image, ks):
    """Brute force in float64 with Python loops, independent of the vectorised code (no ties)."""
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


def _topk_recall(image_emb, text_emb, text_to_image, ks):
    """R@K the way CLIP_benchmark computes it: is a positive among the top-k indices of each query?"""
    img = image_emb.double() / image_emb.double().norm(dim=1, keepdim=True)
    txt = text_emb.double() / text_emb.double().norm(dim=1, keepdim=True)
    scores = txt @ img.T  # (N_txt, N_img)
    positive = torch.zeros_like(scores, dtype=torch.bool)  # (N_txt, N_img)
    positive[torch.arange(len(txt)), text_to_image.long()] = True
    out = {"t2i": {}, "i2t": {}}
    for k in ks:
        top_img = scores.topk(min(k, scores.shape[1]), dim=1).indices  # (N_txt, k)
        hit_t2i = positive.gather(1, top_img).any(dim=1)  # (N_txt,)
        top_txt = scores.T.topk(min(k, scores.shape[0]), dim=1).indices  # (N_img, k)
        hit_i2t = positive.T.gather(1, top_txt).any(dim=1)  # (N_img,)
        out["t2i"][f"R@{k}"] = float(100.0 * np.mean(hit_t2i.numpy()))
        out["i2t"][f"R@{k}"] = float(100.0 * np.mean(hit_i2t.numpy()))
    return out


@pytest.fixture
def random_problem():
    gen = torch.Generator().manual_seed(0)
    n_img, n_txt, dim = 37, 101, 8
    images = torch.randn(n_img, dim, generator=gen)
    # Every image gets >= 1 caption, the rest are assigned at random (multi-caption images).
    t2i = torch.cat([torch.arange(n_img), torch.randint(0, n_img, (n_txt - n_img,), generator=gen)])
    t2i = t2i[torch.randperm(n_txt, generator=gen)]
    texts = images[t2i] + 1.5 * torch.randn(n_txt, dim, generator=gen)
    return images, texts, t2i


def test_without_ties_equals_topk_recall_and_strict_ranks(random_problem) -> None:
    images, texts, t2i = random_problem
    assert torch.bincount(t2i).max() >= 3  # some images really have several captions
    ks = (1, 3, 5, 10, 37, 200)
    res = retrieval_metrics(images, texts, t2i, ks=ks)
    topk = _topk_recall(images, texts, t2i, ks)
    strict = _strict_reference(images, texts, t2i, ks)
    for direction in ("t2i", "i2t"):
        for k in ks:
            assert res[direction][f"R@{k}"] == topk[direction][f"R@{k}"]  # exactly, not approx
        assert res[direction] == strict[direction]
    ranks = retrieval_ranks(images, texts, t2i)
    assert int(ranks["t2i"].tied.sum()) == 0 and int(ranks["i2t"].tied.sum()) == 0
    assert 0.0 < res["t2i"]["R@1"] < 100.0 and 0.0 < res["i2t"]["R@1"] < 100.0  # non-degenerate


# A tiny problem with every kind of exact tie, small enough to enumerate every tie-break order.
# 4 images, 7 captions (text_to_image = [0, 1, 2, 2, 3, 3, 0]):
#   img1 is a copy of img0                 -> t2i ties between two candidates
#   c1 (img1) is a copy of c0 (img0)       -> duplicate caption texts of different images
#   c3 is a copy of c2, both of img2       -> two own captions tied (m' = 2)
#   c6 (img0) is a copy of c4 (img3)       -> an own caption (c4) tied with another image's
def _tied_problem():
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(4, 3, generator=gen)
    images[1] = images[0]
    t2i = torch.tensor([0, 1, 2, 2, 3, 3, 0])
    texts = images[t2i] + 0.3 * torch.randn(7, 3, generator=gen)
    texts[1], texts[3], texts[6] = texts[0], texts[2], texts[4]
    return images, texts, t2i


def _enumerated(image_emb, text_emb, text_to_image, ks):
    """Per-query mean, min and max of hit@K and rank over every order of the candidates.

    A permutation is a priority that breaks score ties; scores are Python float64 dot products,
    so identical embeddings give identical scores without relying on any of the code under test.
    """
    img = [v / np.linalg.norm(v) for v in image_emb.double().numpy()]
    txt = [v / np.linalg.norm(v) for v in text_emb.double().numpy()]
    owner = [int(i) for i in text_to_image]

    def per_query(queries, candidates, is_own):
        out = []
        for q, query in enumerate(queries):
            scores = [float(np.dot(query, c)) for c in candidates]
            ranks = []
            for priority in itertools.permutations(range(len(candidates))):
                order = sorted(range(len(candidates)), key=lambda c: (-scores[c], priority[c]))
                ranks.append(1 + next(pos for pos, c in enumerate(order) if is_own(q, c)))
            ranks = np.array(ranks)
            out.append(
                {
                    "rank": (ranks.mean(), ranks.min(), ranks.max()),
                    **{k: (np.mean(ranks <= k), np.max(ranks <= k), np.min(ranks <= k)) for k in ks},
                }
            )
        return out

    return {
        "t2i": per_query(txt, img, lambda q, c: owner[q] == c),
        "i2t": per_query(img, txt, lambda q, c: owner[c] == q),
    }


def test_planted_ties_equal_the_average_over_every_tie_order() -> None:
    images, texts, t2i = _tied_problem()
    ks = (1, 2, 3, 4)
    ranks = retrieval_ranks(images, texts, t2i)
    res = retrieval_metrics(images, texts, t2i, ks=ks)
    brute = _enumerated(images, texts, t2i, ks)
    # The planted ties are seen: c1's own image ties img0, img2 has two tied own captions, img3's
    # best caption c4 ties c6 of img0.
    assert int(ranks["t2i"].tied.sum()) >= 2
    assert ranks["i2t"].tied_own.tolist()[2] == 2
    assert int(ranks["i2t"].tied[3]) >= 1
    for direction in ("t2i", "i2t"):
        rows = brute[direction]
        assert ranks[direction].expected_rank().tolist() == pytest.approx([r["rank"][0] for r in rows], abs=1e-12)
        for k in ks:
            expected = [r[k][0] for r in rows]
            assert ranks[direction].hit_probability(k).tolist() == pytest.approx(expected, abs=1e-12)
            optimistic = 100.0 * np.mean([r[k][1] for r in rows])
            pessimistic = 100.0 * np.mean([r[k][2] for r in rows])
            assert res[direction][f"R@{k}"] == pytest.approx(100.0 * np.mean(expected), abs=1e-9)
            assert pessimistic - 1e-9 <= res[direction][f"R@{k}"] <= optimistic + 1e-9
        mean_rank = np.mean([r["rank"][0] for r in rows])
        assert res[direction]["mean_rank"] == pytest.approx(mean_rank, abs=1e-12)
        assert res[direction]["median_rank"] == pytest.approx(np.median([r["rank"][0] for r in rows]), abs=1e-12)
        assert np.mean([r["rank"][1] for r in rows]) < mean_rank < np.mean([r["rank"][2] for r in rows])
    # Ties matter here: R@1 lies strictly between the bounds in both directions.
    for direction in ("t2i", "i2t"):
        rows = brute[direction]
        assert 100.0 * np.mean([r[1][2] for r in rows]) < res[direction]["R@1"] < 100.0 * np.mean([r[1][1] for r in rows])


def test_many_identical_captions_all_tie() -> None:
    # 21 images share one caption text: for each of them the other 20 copies score exactly its own
    # score (each distinct embedding is scored once, so no matmul rounding can split the copies).
    gen = torch.Generator().manual_seed(5)
    images = torch.randn(40, 64, generator=gen)
    t2i = torch.arange(40)
    texts = images + 0.5 * torch.randn(40, 64, generator=gen)
    texts[1::2] = texts[0]
    ranks = retrieval_ranks(images, texts, t2i)["i2t"]
    copy_owners = [0, *range(1, 40, 2)]
    assert ranks.tied[copy_owners].tolist() == [20] * 21
    assert ranks.tied[2::2].tolist() == [0] * 19
    assert ranks.tied_own.tolist() == [1] * 40
    # Whichever of them has nothing strictly above gets 1/21 of a hit at R@1.
    hits = ranks.hit_probability(1)
    on_top = ranks.better[copy_owners] == 0
    assert hits[copy_owners].tolist() == pytest.approx([1 / 21 if top else 0.0 for top in on_top.tolist()])
    assert bool(on_top.any())
    res = retrieval_metrics(images, texts, t2i, ks=(1,))
    assert res["i2t"]["R@1"] == pytest.approx(100.0 * float(hits.mean()))


@pytest.mark.parametrize("chunk_bytes", [1, 4 * 7, 4 * 40, 4 * 101 * 2, 4 * 101 * 36, 4 * 101 * 37])
def test_small_chunks_equal_one_chunk_with_ties(random_problem, chunk_bytes: int) -> None:
    images, texts, t2i = random_problem
    images, texts = images.clone(), texts.clone()
    images[5] = images[6]  # captions of images 5 and 6 see their own image tied with the copy
    texts[(t2i == 7) | (t2i == 8)] = texts[t2i == 7][0]  # images 7 and 8: every caption the same
    one_chunk = retrieval_ranks(images, texts, t2i, chunk_bytes=2**40)
    chunked = retrieval_ranks(images, texts, t2i, chunk_bytes=chunk_bytes)
    assert bool((one_chunk["t2i"].tied[(t2i == 5) | (t2i == 6)] == 1).all())
    assert bool((one_chunk["i2t"].tied[[7, 8]] > 0).all())
    for direction in ("t2i", "i2t"):
        for field in ("better", "tied", "tied_own"):
            assert torch.equal(getattr(chunked[direction], field), getattr(one_chunk[direction], field))
        # A matrix product of another height may round the last bit differently; counts never move
        # because every comparison is made within one row of one product.
        torch.testing.assert_close(chunked[direction].own_score, one_chunk[direction].own_score, rtol=0, atol=1e-6)
    assert retrieval_metrics(images, texts, t2i, chunk_bytes=chunk_bytes) == retrieval_metrics(images, texts, t2i, chunk_bytes=2**40)


def test_rows_per_chunk_follow_the_byte_budget() -> None:
    assert DEFAULT_CHUNK_BYTES == 256 * 2**20
    # 500k distinct captions: 256 MiB / (4 B x 500k) = 134 image rows, not a fixed 1024 (2 GB).
    assert _rows_per_chunk(500_000, 500_000, DEFAULT_CHUNK_BYTES) == 134
    # With copies the distinct scores are held too before being spread: 4 B x (400k + 500k).
    assert _rows_per_chunk(400_000, 500_000, DEFAULT_CHUNK_BYTES) == 74
    assert _rows_per_chunk(10, 10, 1) == 1  # always at least one row
    assert _rows_per_chunk(10, 10, 10**9) == 25_000_000


@pytest.mark.parametrize("chunk_bytes", [0, -1, 1.5, True])
def test_bad_chunk_bytes_raise(chunk_bytes) -> None:
    with pytest.raises(ValueError, match=r"chunk_bytes must be a positive int"):
        retrieval_metrics(IMAGES, TEXTS, TEXT_TO_IMAGE, chunk_bytes=chunk_bytes)


def test_non_finite_embeddings_raise() -> None:
    texts = TEXTS.clone()
    texts[3, 1] = float("nan")
    with pytest.raises(ValueError, match=r"text_emb holds NaN or inf in 1 row\(s\) \(first: row 3\)"):
        retrieval_metrics(IMAGES, texts, TEXT_TO_IMAGE)


def test_duplicate_caption_texts_counts() -> None:
    stats = duplicate_caption_texts(["b", "a", "c", "a", "b", "a", "d"])
    assert stats == {
        "captions": 7,
        "unique_texts": 4,
        "duplicate_captions": 5,  # three "a" + two "b"
        "duplicated_texts": 2,
        "example": "a",  # the most frequent
    }
    assert stats["captions"] - stats["unique_texts"] == stats["duplicate_captions"] - stats["duplicated_texts"]
    assert duplicate_caption_texts(["x", "y", "y", "x"])["example"] == "x"  # first seen of equals
    assert duplicate_caption_texts(["A", "a", "a "]) == {
        "captions": 3,
        "unique_texts": 3,
        "duplicate_captions": 0,
        "duplicated_texts": 0,
        "example": None,
    }
    assert duplicate_caption_texts([])["example"] is None


def test_duplicate_caption_texts_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match=r"captions\[1\] must be a str, got int"):
        duplicate_caption_texts(["a", 3])
    with pytest.raises(TypeError, match="single str"):
        duplicate_caption_texts("abc")


def test_report_names_are_reexported() -> None:
    assert format_results_table is finetune.evaluation.report.format_results_table
    assert write_results is finetune.evaluation.report.write_results


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
