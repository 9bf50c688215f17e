"""Hard-negative mining (data_tools/mining.py): planted false negatives removed and counted per guard, margins
and the rank window on a hand example, top vs random, mined harder than random, and the batch sampler."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from data_tools.mining import (
    GUARDS,
    MinedNegativeSampler,
    MiningSettings,
    compose_batches,
    format_guard_counts,
    mine_hard_negatives,
    negatives_by_anchor,
)
from data_tools.sampling import ClassPowerSampler, EpochShuffleSampler, MixtureSampler


def settings(**changes) -> MiningSettings:
    base = dict(
        negatives_per_anchor=2,
        rank_min=1,
        rank_max=8,
        absolute_margin=0.0,
        relative_margin=0.0,
        near_duplicate_threshold=0.98,
        sampling="top",
        directions=("t2i", "i2t"),
        seed=0,
    )
    return MiningSettings(**{**base, **changes})


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


# Image 0 is the anchor's. Each planted image is closer to it than the true negatives 5, 6 and 7 are,
# and is a false negative for exactly one reason (cosine to image 0 in brackets):
#   1 same label (0.958)   2 same bytes (0.944)   3 near duplicate (0.995)   4 a caption equal to image 0's (0.928)
#   5 true negative (0.857)  6 true negative (0.781)  7 true negative, far (0.0)
SPREAD = {1: 0.3, 2: 0.35, 3: 0.1, 4: 0.4, 5: 0.6, 6: 0.8}


def planted():
    eye = np.eye(8, dtype=np.float32)
    image = np.stack([eye[0]] + [eye[0] + c * eye[i] for i, c in SPREAD.items()] + [eye[7]])
    image = unit(image)  # (8, 8)
    return dict(
        image_emb=image,
        text_emb=image.copy(),  # one caption per image, embedded on its image: every positive scores 1
        text_to_image=np.arange(8),
        pair_rows=np.arange(8) + 100,
        image_ids=[f"img{i}" for i in range(8)],
        captions=["alpha", "beta", "gamma", "delta", "alpha", "eps", "zeta", "eta"],
        image_labels=["x", "x", "y", "z", "w", "v", "u", "t"],
        image_hashes=["hA", "hB", "hA", "hD", "hE", "hF", "hG", "hH"],
    )


def expected_cos(i: int) -> float:
    return 1 / np.sqrt(1 + SPREAD[i] ** 2)


def test_planted_false_negatives_are_removed_and_each_counted_under_its_guard():
    result = mine_hard_negatives(**planted(), settings=settings(), anchors=np.array([0]))
    for direction in ("t2i", "i2t"):
        c = result.counts[direction]
        assert c["candidates"] == 8  # all eight ranks are in the window
        assert {g: c[g] for g in GUARDS} == {g: 1 for g in GUARDS}, direction
        assert c["margin"] == 0 and c["eligible"] == 3 and c["kept"] == 2
    rows = result.rows
    assert rows["anchor_row"].tolist() == [100] * 4 and rows["anchor_image_id"].tolist() == ["img0"] * 4
    assert rows["direction"].tolist() == ["t2i", "t2i", "i2t", "i2t"]
    # the two nearest true negatives, in rank order (ranks count the 5 guarded candidates above them)
    assert rows["negative_image_id"].tolist() == ["img5", "img6"] * 2
    assert rows["negative_row"].tolist() == [105, 106] * 2
    assert rows["rank"].tolist() == [6, 7] * 2
    np.testing.assert_allclose(rows["score"], [expected_cos(5), expected_cos(6)] * 2, rtol=1e-5)
    np.testing.assert_allclose(rows["positive_score"], 1.0, rtol=1e-6)


def test_a_candidate_caught_by_two_guards_counts_under_the_first_only():
    data = planted()
    data["image_labels"][2] = "x"  # image 2: same bytes AND same label; same_label comes first
    result = mine_hard_negatives(**data, settings=settings(directions=("t2i",)), anchors=np.array([0]))
    c = result.counts["t2i"]
    assert (c["same_label"], c["duplicate_hash"]) == (2, 0)
    assert sum(c[g] for g in GUARDS) == 5


def test_without_labels_the_same_label_guard_never_fires():
    data = {**planted(), "image_labels": None}
    result = mine_hard_negatives(**data, settings=settings(negatives_per_anchor=8), anchors=np.array([0]))
    assert result.counts["t2i"]["same_label"] == 0
    assert "img1" in result.rows["negative_image_id"].tolist()  # now a legitimate negative


def test_margins_and_the_rank_window_on_a_hand_example():
    def kept(**changes) -> list[str]:
        r = mine_hard_negatives(
            **planted(), settings=settings(negatives_per_anchor=8, directions=("t2i",), **changes), anchors=np.array([0])
        )
        return r.rows["negative_image_id"].tolist()

    assert kept() == ["img5", "img6", "img7"]
    # positive 1.0: absolute margin 0.15 keeps score <= 0.85: image 5 (0.857) goes, 6 (0.781) stays
    assert kept(absolute_margin=0.15) == ["img6", "img7"]
    # relative margin 0.25 keeps score <= 1 - 0.25 * |1| = 0.75
    assert kept(relative_margin=0.25) == ["img7"]
    r = mine_hard_negatives(**planted(), settings=settings(relative_margin=0.25, directions=("t2i",)), anchors=np.array([0]))
    assert r.counts["t2i"]["margin"] == 2
    # rank window [7, 8]: ranks 1-6 are never looked at (nor counted)
    assert kept(rank_min=7) == ["img6", "img7"]
    r = mine_hard_negatives(**planted(), settings=settings(rank_min=7, directions=("t2i",)), anchors=np.array([0]))
    assert r.counts["t2i"]["candidates"] == 2 and sum(r.counts["t2i"][g] for g in GUARDS) == 0
    # rank_max 6 leaves one true negative in the window
    assert kept(rank_max=6) == ["img5"]


def test_a_negative_positive_score_keeps_the_relative_margin_below_it():
    # caption 0 scores its own image at -0.287 (a domain the model does not know yet)
    e = np.eye(4, dtype=np.float32)
    image = unit(np.stack([e[0], -e[0] - 0.5 * e[1], -e[1], e[0] - e[1]]))
    text = unit(np.stack([-0.3 * e[0] + e[1], e[1], e[2], e[3]]))
    data = dict(
        image_emb=image,
        text_emb=text,
        text_to_image=np.arange(4),
        pair_rows=np.arange(4),
        image_ids=list("abcd"),
        captions=list("pqrs"),
        image_labels=None,
        image_hashes=list("wxyz"),
    )
    r = mine_hard_negatives(
        **data, settings=settings(relative_margin=0.5, negatives_per_anchor=4, directions=("t2i",)), anchors=np.array([0])
    )
    pos = float(r.rows["positive_score"][0])
    assert pos == pytest.approx(-0.3 / np.sqrt(1.09), abs=1e-5)
    # kept: score <= pos - 0.5 |pos| = -0.43: images c (-0.958) and d (-0.88); b (-0.171) sits above the positive's
    # margin (a pos * (1 - margin) rule would have let it through, above the positive itself)
    assert r.rows["negative_image_id"].tolist() == ["d", "c"]
    assert r.counts["t2i"]["margin"] == 1


def clustered(n_img=240, seed=0, labels=True):
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(12, 16)))
    image = unit(centres[np.arange(n_img) % 12] + 0.6 * rng.normal(size=(n_img, 16)))
    t2i = np.repeat(np.arange(n_img), 2)
    text = unit(image[t2i] + 0.4 * rng.normal(size=(len(t2i), 16)))
    return dict(
        image_emb=image,
        text_emb=text,
        text_to_image=t2i,
        pair_rows=np.arange(len(t2i)),
        image_ids=[str(i) for i in range(n_img)],
        captions=[f"caption {i}" for i in range(len(t2i))],
        image_labels=[str(i % 5) for i in range(n_img)] if labels else None,
        image_hashes=[f"h{i}" for i in range(n_img)],
    )


def test_mined_negatives_score_higher_on_average_than_random_ones():
    result = mine_hard_negatives(**clustered(), settings=settings(negatives_per_anchor=4, rank_max=32, relative_margin=0.05))
    for direction in ("t2i", "i2t"):
        mined, rand = result.mean_score[direction]["mined"], result.mean_score[direction]["random"]
        assert mined > rand + 0.2, (direction, mined, rand)
        assert np.isclose(result.rows["score"][result.rows["direction"] == direction].mean(), mined, atol=1e-5)


def test_top_keeps_the_best_and_random_draws_among_the_eligible_reproducibly():
    data = clustered()
    s = settings(negatives_per_anchor=2, rank_max=32, directions=("t2i",))
    everything = mine_hard_negatives(**data, settings=settings(negatives_per_anchor=32, rank_max=32, directions=("t2i",)))
    top = mine_hard_negatives(**data, settings=s)
    rand = mine_hard_negatives(**data, settings=settings(**{**s.__dict__, "sampling": "random"}))
    again = mine_hard_negatives(**data, settings=settings(**{**s.__dict__, "sampling": "random"}))
    other_seed = mine_hard_negatives(**data, settings=settings(**{**s.__dict__, "sampling": "random", "seed": 1}))
    eligible = {}
    for a, n, rank in zip(everything.rows["anchor_row"], everything.rows["negative_row"], everything.rows["rank"]):
        eligible.setdefault(int(a), []).append((int(rank), int(n)))

    def by_anchor(result) -> dict[int, list[int]]:
        table: dict[int, list[int]] = {}
        for a, n in zip(result.rows["anchor_row"], result.rows["negative_row"]):
            table.setdefault(int(a), []).append(int(n))
        return table

    top_sets, rand_sets = by_anchor(top), by_anchor(rand)
    for a, negs in top_sets.items():
        assert negs == [n for _, n in sorted(eligible[a])[:2]]  # top = the two best-ranked eligible
    for a, negs in rand_sets.items():
        assert set(negs) <= {n for _, n in eligible[a]} and len(negs) == min(2, len(eligible[a]))
    assert rand_sets != top_sets  # random is not top in disguise
    assert top.mean_score["t2i"]["mined"] > rand.mean_score["t2i"]["mined"]
    for name in rand.rows:  # same seed, same rows
        assert (rand.rows[name] == again.rows[name]).all(), name
    assert by_anchor(other_seed) != rand_sets  # another seed, another draw


def test_guard_counts_table_lists_every_guard_in_order():
    result = mine_hard_negatives(**planted(), settings=settings(), anchors=np.array([0]))
    table = format_guard_counts(result.counts, result.mean_score)
    positions = [table.index(f"guard: {g}") for g in GUARDS]
    assert positions == sorted(positions)
    assert "| guard: same_label | 1 | 1 | 2 |" in table


# ----------------------------------------------------------------------------- the batch sampler


def mined_table(n_rows=200, seed=0, per_anchor=4) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    anchors = np.repeat(np.arange(n_rows), per_anchor)
    negatives = rng.integers(0, n_rows, size=len(anchors))
    return negatives_by_anchor(anchors, negatives, rng.random(len(anchors)))


def assert_groups_share_their_batch(order: list[int], stats, global_batch: int):
    assert stats.groups
    for chunk_index, anchor, negs in stats.groups:
        chunk = order[chunk_index * global_batch : (chunk_index + 1) * global_batch]
        assert anchor in chunk and all(n in chunk for n in negs), (chunk_index, anchor, negs)


def test_composed_epoch_is_a_permutation_and_each_anchor_gets_its_negatives_in_its_batch():
    base = EpochShuffleSampler(200, seed=3).order(0).tolist()
    table = mined_table()
    order, stats = compose_batches(base, table, global_batch=16, per_anchor=2)
    assert Counter(order) == Counter(base)  # same rows, same counts: epoch length and fractions unchanged
    assert_groups_share_their_batch(order, stats, 16)
    assert stats.placed == sum(len(n) for _, _, n in stats.groups)
    assert 0.5 < stats.coverage() <= 1.0  # measured: negatives already visited this epoch are not repeated


def test_class_and_replay_fractions_do_not_drift():
    labels = [str(i % 7 if i % 3 else 0) for i in range(150)]  # a long tail
    base = MixtureSampler(ClassPowerSampler(labels, 0.5, 150, seed=1), [(150, 40, 0.2)], seed=1)
    sampler = MinedNegativeSampler(base, global_batch=24, per_anchor=3, seed=1)
    sampler.set_negatives(mined_table(150, per_anchor=5), "file-a")
    for epoch in range(3):
        mined = sampler.order(epoch).tolist()
        plain = base.order(epoch).tolist()
        assert len(mined) == len(plain) and Counter(mined) == Counter(plain)
        replay_share = lambda o: sum(r >= 150 for r in o) / len(o)  # noqa: E731
        assert replay_share(mined) == replay_share(plain)


def test_sampler_is_deterministic_follows_its_file_and_resumes_exactly():
    def build(name="file-a", table=None):
        s = MinedNegativeSampler(EpochShuffleSampler(120, seed=5), global_batch=16, per_anchor=2, seed=5)
        s.set_negatives(table if table is not None else mined_table(120), name)
        return s

    first, second = build(), build()
    for epoch in (0, 1, 4):
        first.epoch = second.epoch = epoch
        assert list(first) == list(second)  # a fresh sampler (a resumed run) replays the same order
    first.epoch = 1
    before = list(first)
    first.set_negatives(mined_table(120, seed=9), "file-b")  # a refresh: the cached order follows the new file
    assert list(first) != before
    assert list(build("file-b", mined_table(120, seed=9)).order(1).tolist()) == list(first)
    plain = MinedNegativeSampler(EpochShuffleSampler(120, seed=5), 16, 2, seed=5)
    assert plain.order(2).tolist() == EpochShuffleSampler(120, seed=5).order(2).tolist()  # no file yet: the base order


@pytest.mark.parametrize("processes", [1, 2, 4])
def test_negatives_share_the_global_batch_accelerate_deals_to_the_processes(processes):
    per_process = 8
    sampler = MinedNegativeSampler(EpochShuffleSampler(160, seed=2), per_process * processes, per_anchor=3, seed=2)
    sampler.set_negatives(mined_table(160), "f")
    batches = BatchSampler(sampler, per_process, drop_last=True)
    shards = [list(BatchSamplerShard(batches, num_processes=processes, process_index=p)) for p in range(processes)]
    steps = min(len(s) for s in shards)
    global_batches = [set().union(*(shards[p][s] for p in range(processes))) for s in range(steps)]
    order = sampler.order(0).tolist()
    stats = sampler.last_stats
    checked = 0
    for chunk_index, anchor, negs in stats.groups:
        if chunk_index < steps:
            assert anchor in global_batches[chunk_index] and set(negs) <= global_batches[chunk_index]
            checked += 1
    assert checked > 10 and len(order) == 160


def test_a_group_larger_than_the_batch_is_refused():
    with pytest.raises(ValueError, match="global batch of at least 5"):
        MinedNegativeSampler(EpochShuffleSampler(10, seed=0), global_batch=4, per_anchor=4, seed=0)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="rank_min <= rank_max"):
        settings(rank_min=9, rank_max=3)
    with pytest.raises(ValueError, match="'top' or 'random'"):
        settings(sampling="best")
    assert torch.__version__  # torch imported for the sampler's generator
