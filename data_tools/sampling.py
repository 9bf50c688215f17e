"""Training samplers: which rows an epoch visits, in which order, computed from (seed, epoch) alone.

A resumed run rebuilds the sampler, sets the epoch it stopped in, and replays that epoch's order
exactly; `skip_first_batches` then drops the batches already trained on. Nothing about an epoch's
order is carried in RNG state, so no RNG needs saving for the data order.

The loop owns the epoch counter and assigns it:

    sampler.epoch = epoch
    for batch in loader: ...

There is deliberately no `set_epoch`. Accelerate calls `set_epoch` on a sampler that has one, with its
own count of passes over the loader object it iterates; that count restarts at 0 on the loader that
`skip_first_batches` returns, so a run resumed mid-epoch 3 would replay epoch 0's order. Without the
method Accelerate leaves the sampler alone and the loop's assignment is the only source of truth.

An epoch may draw a different number of rows than the last (repeat-factor and class-balanced
samplers do): `len(sampler)` is the length of the current epoch's order, so `len(loader)` (and the
steps per epoch derived from it) follows `sampler.epoch`.
"""

from __future__ import annotations

import abc

import torch
from torch.utils.data import Sampler


class EpochSampler(Sampler[int], abc.ABC):
    """Base class: subclasses implement `epoch_order(epoch, generator)`, a pure function of its arguments.

    `epoch` is a plain attribute the loop assigns (see the module docstring for why not `set_epoch`).
    """

    def __init__(self, seed: int):
        self.seed = seed
        self.epoch = 0
        self._cached: tuple[int, torch.Tensor] | None = None  # (epoch, order): len() and iter() agree, computed once

    def epoch_generator(self, epoch: int) -> torch.Generator:
        """The only randomness an epoch may use; distinct and reproducible per (seed, epoch)."""
        return torch.Generator().manual_seed(self.seed * 100_003 + epoch)

    @abc.abstractmethod
    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor | list[int]:
        """Row indices to visit in `epoch`, in order (repeats allowed). Use only `generator` for randomness."""

    def order(self, epoch: int) -> torch.Tensor:
        """`epoch_order` for `epoch` as an int64 tensor (8 bytes a row), computed once per epoch."""
        if self._cached is None or self._cached[0] != epoch:
            order = torch.as_tensor(self.epoch_order(epoch, self.epoch_generator(epoch)), dtype=torch.int64)  # (N_epoch,)
            self._cached = (epoch, order)
        return self._cached[1]

    def __iter__(self):
        return iter(self.order(self.epoch).tolist())

    def __len__(self) -> int:
        return len(self.order(self.epoch))


class EpochShuffleSampler(EpochSampler):
    """Every row once per epoch, in a fresh uniform permutation per epoch."""

    def __init__(self, num_rows: int, seed: int):
        super().__init__(seed)
        self.num_rows = num_rows

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.num_rows, generator=generator)  # (num_rows,)

    def __len__(self) -> int:
        return self.num_rows  # known without drawing the permutation
