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
import math

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


# ----------------------------------------------------------------------------- long-tail samplers
#
# Each one takes plain arguments (a label per row, a power, a threshold) and keeps the contract above:
# an epoch's order depends on (seed, epoch) alone, so a resumed run replays it exactly, and every
# process computes the same order, which Accelerate then shards batch by batch.


def class_counts(labels: list[str]) -> dict[str, int]:
    """Rows per class, classes in order of first appearance."""
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return counts


def frequency_groups(counts: dict[str, int], head_fraction: float = 1 / 3, tail_fraction: float = 1 / 3) -> dict[str, str]:
    """{class: "head" | "medium" | "tail"} by frequency rank: the most frequent ceil(C * head_fraction)
    classes are head, the least frequent ceil(C * tail_fraction) tail, the rest medium (ties in count
    broken by name). With fewer than 3 classes every class is "head" and "tail" is empty.
    """
    ranked = sorted(counts, key=lambda c: (-counts[c], c))
    n = len(ranked)
    if n < 3:
        return {c: "head" for c in ranked}
    n_head, n_tail = math.ceil(n * head_fraction), math.ceil(n * tail_fraction)
    n_tail = min(n_tail, n - n_head)
    return {c: "head" if i < n_head else ("tail" if i >= n - n_tail else "medium") for i, c in enumerate(ranked)}


def class_power_row_weights(labels: list[str], power: float) -> torch.Tensor:
    """(N,) float64 draw weight per row so that class c is drawn with probability ~ n_c ** power.

    power 1: uniform over rows (class frequencies as in the data); 0.5: square-root sampling;
    0: class-balanced (every class equally often). A row of class c weighs n_c ** (power - 1).
    """
    counts = class_counts(labels)
    per_class = {c: float(n) ** (power - 1.0) for c, n in counts.items()}
    return torch.tensor([per_class[label] for label in labels], dtype=torch.float64)


def class_target_frequencies(labels: list[str], power: float) -> dict[str, float]:
    """The class frequencies `ClassPowerSampler(labels, power)` draws, as fractions summing to 1."""
    counts = class_counts(labels)
    mass = {c: float(n) ** power for c, n in counts.items()}
    total = sum(mass.values())
    return {c: m / total for c, m in mass.items()}


class ClassPowerSampler(EpochSampler):
    """Draws `num_draws` rows per epoch with replacement, class c with probability ~ n_c ** power.

    `power=0` is class-balanced sampling, `power=0.5` square-root sampling (Mahajan et al. 2018),
    `power=1` matches the data's class frequencies. Within a class every row is equally likely.
    """

    def __init__(self, labels: list[str], power: float, num_draws: int, seed: int):
        super().__init__(seed)
        if not labels:
            raise ValueError("ClassPowerSampler needs at least one labelled row")
        self.row_weights = class_power_row_weights(labels, power)  # (N,)
        self.num_draws = num_draws

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        return torch.multinomial(self.row_weights, self.num_draws, replacement=True, generator=generator)

    def __len__(self) -> int:
        return self.num_draws


def repeat_factors(labels: list[str], threshold: float) -> torch.Tensor:
    """(N,) float64 LVIS repeat factor per row: r_c = max(1, sqrt(t / f_c)), f_c the fraction of rows of class c.

    Classes rarer than `threshold` (a fraction of the data) are repeated; the rest are seen once.
    """
    counts = class_counts(labels)
    total = len(labels)
    per_class = {c: max(1.0, (threshold / (n / total)) ** 0.5) for c, n in counts.items()}
    return torch.tensor([per_class[label] for label in labels], dtype=torch.float64)


class RepeatFactorSampler(EpochSampler):
    """Repeat-factor sampling (Gupta et al., LVIS 2019): each row appears floor(r) times per epoch, plus one
    more with probability frac(r) (stochastic rounding drawn per epoch), in a shuffled order.

    The epoch's length varies around sum(r); `len()` follows `epoch` (see the module docstring).
    """

    def __init__(self, labels: list[str], threshold: float, seed: int):
        super().__init__(seed)
        if not labels:
            raise ValueError("RepeatFactorSampler needs at least one labelled row")
        self.factors = repeat_factors(labels, threshold)  # (N,)

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        whole = self.factors.floor()
        extra = torch.rand(len(self.factors), generator=generator, dtype=torch.float64) < (self.factors - whole)
        repeats = (whole + extra.double()).long()  # (N,)
        rows = torch.repeat_interleave(torch.arange(len(self.factors)), repeats)  # (sum repeats,)
        return rows[torch.randperm(len(rows), generator=generator)]


class MixtureSampler(EpochSampler):
    """The rows of a primary dataset (in its own sampler's order) mixed with extra datasets by fraction.

    The datasets are concatenated, primary first: part k occupies rows [offset_k, offset_k + size_k).
    An epoch holds the primary sampler's epoch (L rows) plus, for each extra part with fraction f_k,
    round(L * f_k / (1 - sum f)) rows of that part (each row once, in a fresh permutation, repeated
    if the part is smaller), all shuffled together: extras make up exactly their fraction of the
    epoch. Everything is drawn from the epoch's generator, so the mix is deterministic and resumable.
    """

    def __init__(self, primary: EpochSampler, extras: list[tuple[int, int, float]], seed: int):
        super().__init__(seed)
        total = sum(f for _, _, f in extras)
        if not 0 <= total < 1:
            raise ValueError(f"the extra datasets' fractions must sum to less than 1, got {total}")
        self.primary, self.extras, self.total_fraction = primary, extras, total

    def counts(self, primary_rows: int) -> list[int]:
        """Rows drawn from each extra part in an epoch whose primary part has `primary_rows` rows."""
        return [round(primary_rows * f / (1 - self.total_fraction)) for _, _, f in self.extras]

    def epoch_order(self, epoch: int, generator: torch.Generator) -> torch.Tensor:
        base = torch.as_tensor(self.primary.epoch_order(epoch, generator), dtype=torch.int64)  # (L,)
        parts = [base]
        for (offset, size, _), count in zip(self.extras, self.counts(len(base))):
            laps = -(-count // size) if count else 0
            rows = torch.cat([torch.randperm(size, generator=generator) for _ in range(laps)]) if laps else base[:0]
            parts.append(offset + rows[:count])
        rows = torch.cat(parts)
        return rows[torch.randperm(len(rows), generator=generator)]
