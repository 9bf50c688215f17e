"""Tests for data_tools.sampling: an epoch's order is a function of (seed, epoch); lengths may vary per epoch."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from data_tools.sampling import EpochSampler, EpochShuffleSampler


def epoch_orders(sampler, epochs) -> list[list[int]]:
    out = []
    for epoch in epochs:
        sampler.epoch = epoch
        out.append(list(sampler))
    return out


def test_same_seed_and_epoch_give_the_same_order_whatever_came_before():
    a = EpochShuffleSampler(50, seed=3)
    b = EpochShuffleSampler(50, seed=3)
    # `a` walks epochs 0..3; a fresh `b` (a resumed run) jumps straight to epoch 3 and to epoch 1.
    orders = epoch_orders(a, range(4))
    assert epoch_orders(b, [3, 1]) == [orders[3], orders[1]]
    assert list(a) == orders[3]  # iterating twice in one epoch replays it
    for order in orders:
        assert sorted(order) == list(range(50)) and len(order) == len(a) == 50  # each row once


def test_order_is_the_documented_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(20, seed=7)
    sampler.epoch = 2
    expected = torch.randperm(20, generator=torch.Generator().manual_seed(7 * 100_003 + 2)).tolist()
    assert list(sampler) == expected


def test_different_epochs_and_seeds_differ():
    orders = epoch_orders(EpochShuffleSampler(50, seed=0), range(3))
    assert orders[0] != orders[1] != orders[2] != orders[0]
    assert epoch_orders(EpochShuffleSampler(50, seed=1), [0]) != orders[:1]


def test_no_set_epoch_so_accelerate_cannot_reset_the_order():
    # Accelerate calls set_epoch with its own pass counter when a sampler has one (see the module docstring).
    assert not hasattr(EpochShuffleSampler(4, seed=0), "set_epoch")


class GrowingSampler(EpochSampler):
    """Draws 10 + 3 * epoch rows with replacement: a stand-in for repeat-factor sampling."""

    def __init__(self, num_rows: int, seed: int):
        super().__init__(seed)
        self.num_rows = num_rows

    def epoch_order(self, epoch, generator):
        return torch.randint(self.num_rows, (10 + 3 * epoch,), generator=generator)


def test_per_epoch_length_drives_the_loader_length():
    sampler = GrowingSampler(num_rows=6, seed=1)
    loader = DataLoader(list(range(100, 106)), batch_size=4, sampler=sampler, drop_last=True)
    for epoch, (rows, batches) in enumerate([(10, 2), (13, 3), (16, 4), (19, 4)]):
        sampler.epoch = epoch
        assert len(sampler) == rows
        assert len(loader) == batches
        seen = [b.tolist() for b in loader]
        assert len(seen) == batches and all(len(b) == 4 for b in seen)
        order = sampler.order(epoch).tolist()
        assert [v for b in seen for v in b] == [100 + r for r in order[: 4 * batches]]  # the epoch's rows, in order
    sampler.epoch = 1
    again = GrowingSampler(num_rows=6, seed=1)
    again.epoch = 1
    assert list(sampler) == list(again)


def test_base_class_names_the_missing_method():
    with pytest.raises(TypeError, match="abstract method.*epoch_order"):
        EpochSampler(seed=0)


def test_no_attribute_accelerate_would_mistake_for_a_torch_generator():
    # Accelerate's prepare() synchronises `sampler.generator` if there is one; a method of that name breaks it.
    assert not hasattr(EpochShuffleSampler(4, seed=0), "generator")
