"""Long-tail samplers hit their target class frequencies, replay mixes by exact fraction, class weights
match hand computations, and all of it is a function of (seed, epoch) alone."""

from __future__ import annotations

import math
from collections import Counter

import datasets
import pytest

from data_tools.class_weights import class_weights
from data_tools.mixing import concatenate_training_sets
from data_tools.sampling import (
    ClassPowerSampler,
    EpochShuffleSampler,
    MixtureSampler,
    RepeatFactorSampler,
    class_target_frequencies,
    frequency_groups,
    repeat_factors,
)

# 4 classes, long-tailed: 500 / 200 / 50 / 10 rows
LABELS = ["a"] * 500 + ["b"] * 200 + ["c"] * 50 + ["d"] * 10


def empirical(sampler, epochs: int) -> dict[str, float]:
    counts = Counter()
    for epoch in range(epochs):
        sampler.epoch = epoch
        counts.update(LABELS[i] for i in sampler)
    total = sum(counts.values())
    return {c: counts[c] / total for c in "abcd"}


@pytest.mark.parametrize("power", [0.0, 0.5, 1.0])
def test_class_power_sampler_hits_its_target_frequencies(power):
    # 40 epochs x 760 draws = 30,400 draws: the standard error of a frequency is <= 0.003, so 0.015 is 5 sigma.
    target = class_target_frequencies(LABELS, power)
    got = empirical(ClassPowerSampler(LABELS, power, num_draws=len(LABELS), seed=1), epochs=40)
    for c in "abcd":
        assert got[c] == pytest.approx(target[c], abs=0.015), (c, got, target)
    if power == 0.0:
        assert target == pytest.approx({c: 0.25 for c in "abcd"})
    if power == 0.5:
        roots = {c: math.sqrt(n) for c, n in Counter(LABELS).items()}
        assert target["d"] == pytest.approx(roots["d"] / sum(roots.values()))


def test_repeat_factor_sampler_repeats_rare_classes_by_sqrt_t_over_f():
    threshold = 0.1
    factors = repeat_factors(LABELS, threshold)
    f = {c: n / len(LABELS) for c, n in Counter(LABELS).items()}
    expected = {c: max(1.0, math.sqrt(threshold / f[c])) for c in "abcd"}  # a, b: 1; c ~1.23; d ~2.76
    assert factors[LABELS.index("d")].item() == pytest.approx(expected["d"])
    assert factors[0].item() == 1.0
    sampler = RepeatFactorSampler(LABELS, threshold, seed=0)
    epochs = 200
    counts = Counter()
    for epoch in range(epochs):
        sampler.epoch = epoch
        order = list(sampler)
        assert len(order) == len(sampler)  # the epoch's own length
        counts.update(LABELS[i] for i in order)
    n = Counter(LABELS)
    for c in "abcd":
        # mean appearances of a row of class c per epoch == its repeat factor (stochastic rounding)
        assert counts[c] / (epochs * n[c]) == pytest.approx(expected[c], rel=0.03), c


def test_samplers_are_a_function_of_seed_and_epoch():
    for make in (
        lambda: ClassPowerSampler(LABELS, 0.5, 100, seed=3),
        lambda: RepeatFactorSampler(LABELS, 0.1, seed=3),
        lambda: MixtureSampler(ClassPowerSampler(LABELS, 0.0, 100, seed=3), [(760, 40, 0.2)], seed=3),
    ):
        a, b = make(), make()
        orders = []
        for epoch in range(3):
            a.epoch = epoch
            orders.append(list(a))
        b.epoch = 2  # a resumed run jumps straight to epoch 2
        assert list(b) == orders[2]
        assert orders[0] != orders[1]


def test_mixture_draws_each_extra_set_for_exactly_its_fraction():
    primary = EpochShuffleSampler(60, seed=0)
    sampler = MixtureSampler(primary, [(60, 10, 0.25), (70, 100, 0.1)], seed=0)
    order = list(sampler)
    # primary 60 rows are 65% of the epoch: extras 60*0.25/0.65 ~ 23 and 60*0.1/0.65 ~ 9 rows
    assert sorted(i for i in order if i < 60) == list(range(60))
    first = [i for i in order if 60 <= i < 70]
    second = [i for i in order if 70 <= i < 170]
    assert len(first) == round(60 * 0.25 / 0.65) == 23 and len(second) == round(60 * 0.1 / 0.65) == 9
    assert Counter(first).most_common(1)[0][1] == 3  # 10 rows cycled over 23 draws: each 2 or 3 times
    assert len(set(second)) == 9  # fewer draws than rows: no repeats
    with pytest.raises(ValueError, match="sum to less than 1"):
        MixtureSampler(primary, [(60, 10, 0.6), (70, 10, 0.4)], seed=0)


def test_class_weights_match_hand_computation_and_average_one_over_rows():
    labels = ["a"] * 6 + ["b"] * 3 + ["c"] * 1
    inv = class_weights(labels, "inverse_frequency", beta=0.0)
    # raw 1/6, 1/3, 1 ; sum_rows raw = 3 -> scale 10/3
    assert inv == pytest.approx({"a": 10 / 18, "b": 10 / 9, "c": 10 / 3})
    beta = 0.9
    eff = class_weights(labels, "effective_number", beta=beta)
    raw = {c: (1 - beta) / (1 - beta**n) for c, n in {"a": 6, "b": 3, "c": 1}.items()}
    scale = 10 / (6 * raw["a"] + 3 * raw["b"] + raw["c"])
    assert eff == pytest.approx({c: w * scale for c, w in raw.items()})
    for weights in (inv, eff):
        assert sum(weights[label] for label in labels) / len(labels) == pytest.approx(1.0)
    # beta -> 0 makes every class equal (effective number 1)
    assert class_weights(labels, "effective_number", beta=0.0) == pytest.approx({"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="unknown class weight method"):
        class_weights(labels, "focal", beta=0.5)


def test_frequency_groups_split_by_rank_thirds():
    counts = {"a": 100, "b": 50, "c": 40, "d": 30, "e": 5, "f": 1, "g": 9}
    groups = frequency_groups(counts)
    assert [c for c in sorted(counts, key=lambda c: -counts[c]) if groups[c] == "head"] == ["a", "b", "c"]
    assert {c for c, g in groups.items() if g == "tail"} == {"g", "e", "f"}
    assert groups["d"] == "medium"


def _pairs(n_images: int, captions: int, label: str | None) -> datasets.Dataset:
    rows = {
        "image": [{"bytes": b"x", "path": None}] * (n_images * captions),
        "caption": [f"c{i}" for i in range(n_images * captions)],
        "image_index": [i // captions for i in range(n_images * captions)],
        "source_row": [i // captions for i in range(n_images * captions)],
        "image_id": [str(i // captions) for i in range(n_images * captions)],
    }
    if label is not None:
        rows["label"] = [label] * (n_images * captions)
    return datasets.Dataset.from_dict(rows)


def test_concatenated_sets_never_share_an_image_index_and_replay_rows_are_unlabelled():
    primary, replay = _pairs(3, 2, "cat"), _pairs(4, 1, None)
    pairs, ranges = concatenate_training_sets(primary, [replay], ["cat", "dog"])
    assert ranges == [(6, 4)]
    assert pairs["image_index"] == [0, 0, 1, 1, 2, 2, 3, 4, 5, 6]
    assert pairs["label_id"] == [0] * 6 + [-1] * 4
    assert pairs["label"][6:] == [""] * 4
