"""Classification baselines on frozen image features: a linear probe and k-NN (math only, no model code).

Evaluation reports these beside "zero_shot" and "adapted" for labelled eval sets, as CLIP_benchmark and
CLIP-LoRA do: they say how much class information the base model's image embeddings already hold
without any text, so an adapted model's gain can be read against a trained classifier rather than
only against prompts. Both take L2-normalised (N, D) image embeddings of the base model (numpy or CPU
torch) with one string label per row, and return the same `BaselineResult`.

Model selection. Each baseline has one knob (the probe's regularisation C, k-NN's k). It is chosen on
a held-out part of the TRAINING rows, never on the test rows: `stratified_holdout_split` holds out
about ``holdout_fraction`` of every class that has at least two training rows (at least one row of
such a class, never all of it), the knob is scored by top-1 on the held-out rows, and the final model
is then refit on all training rows with the chosen value. When every class has a single training row
nothing can be held out; selection is skipped and a documented default is used (`DEFAULT_C`,
`DEFAULT_K`; a grid of a single value is that value), which ``chosen["selected_on"]`` says.

Test labels may name a class that has no training row: it can never be predicted, and it still
counts (as wrong) in top1 and, with accuracy 0, in macro_top1. Training classes missing from the test
set are fine.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "C_GRID",
    "DEFAULT_C",
    "DEFAULT_K",
    "K_GRID",
    "MAX_ITER",
    "NO_HOLDOUT",
    "BaselineResult",
    "knn",
    "linear_probe",
    "stratified_holdout_split",
]

# Inverse regularisation strengths tried by the probe, half a decade apart (1e-2 ... 1e4). Unit-norm
# features give small logits, so useful values sit well above sklearn's default of 1; the sweep is
# cheap next to embedding the images.
C_GRID: tuple[float, ...] = tuple(10.0 ** (e / 2) for e in range(-4, 9))
# C when nothing can be held out (one training row per class). With so few rows a strongly
# regularised probe is close to a centred class-mean classifier, which is what one example per
# class supports.
DEFAULT_C = 1.0
# Neighbour counts tried by k-NN; values above the number of rows that vote are cut to it.
K_GRID: tuple[int, ...] = (1, 3, 5, 10, 20, 50)
# k when nothing can be held out: with one training row per class every k votes like 1-NN anyway.
DEFAULT_K = 1
# lbfgs iterations for the probe: enough for unit-norm features at the top of C_GRID on small sets.
MAX_ITER = 1000
NO_HOLDOUT = "none (too few training rows per class)"

_SIM_BYTES = 64 * 2**20  # float64 similarities held at once by k-NN; sets the query rows per chunk


@dataclass
class BaselineResult:
    """What one baseline scored on the test rows.

    Attributes:
        predictions: one predicted class label per test row, in test-row order.
        top1: percent (0-100) of test rows predicted correctly.
        macro_top1: percent, the mean over classes present in the test labels of per-class accuracy,
            so a rare class counts as much as a frequent one.
        per_class_accuracy: percent for every class in the test labels, keyed by label (sorted).
        chosen: what model selection picked and on what, e.g. ``{"C": 0.316, "holdout_top1": 81.2,
            "holdout_rows": 40, "selected_on": "holdout", "holdout_top1_by_C": {...}}``, or
            ``{"C": 1.0, "selected_on": "none (too few training rows per class)"}``.
    """

    predictions: list[str]
    top1: float
    macro_top1: float
    per_class_accuracy: dict[str, float]
    chosen: dict[str, Any]


def linear_probe(
    train_features,
    train_labels: list[str],
    test_features,
    test_labels: list[str],
    *,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    c_grid: tuple[float, ...] = C_GRID,
) -> BaselineResult:
    """Multinomial logistic regression on frozen features, C chosen on a held-out part of the training rows.

    sklearn's ``LogisticRegression`` (lbfgs, L2 penalty, unpenalised intercept, ``MAX_ITER``
    iterations, ``random_state=seed``) on the L2-normalised float64 features. Each C in ``c_grid`` (increasing,
    each fit starting from the previous C's solution: the regularisation path) is
    fitted on the fit part of `stratified_holdout_split` and scored by top-1 on the held-out part; the
    best C (ties: the smaller C, i.e. the stronger regularisation) is refitted on all training rows.
    With two training classes the model is the binary logistic regression, which is the same family.

    Args:
        train_features: (N_train, D) float array or CPU tensor, rows L2-normalised (normalised again here).
        train_labels: N_train class labels; at least two distinct ones.
        test_features: (N_test, D), same D.
        test_labels: N_test class labels, possibly including classes absent from training.
        seed: seeds the holdout split and the estimator.
        holdout_fraction: share of each class (with >= 2 rows) held out for choosing C, in (0, 1).
        c_grid: the candidate C values (> 0); a single value is used as is when nothing can be held out.

    Returns:
        A `BaselineResult`; ``chosen`` holds ``C``, ``selected_on`` and, when a holdout was used,
        ``holdout_top1``, ``holdout_rows`` and ``holdout_top1_by_C``.

    Raises:
        ValueError: on empty or mismatched inputs, fewer than two training classes, non-finite or
            all-zero feature rows, a holdout_fraction outside (0, 1) or an empty / non-positive c_grid.
    """
    grid = [float(c) for c in c_grid]
    if not grid or not all(math.isfinite(c) and c > 0 for c in grid):
        raise ValueError(f"c_grid must hold positive finite values, got {tuple(c_grid)!r}")
    train_x, train_y, classes, test_x = _prepare(train_features, train_labels, test_features, test_labels, holdout_fraction)

    from sklearn.exceptions import ConvergenceWarning  # imported here: sklearn is slow to import

    fit_idx, holdout_idx = stratified_holdout_split(train_labels, holdout_fraction=holdout_fraction, seed=seed)
    if holdout_idx.size == 0:
        chosen: dict[str, Any] = {"C": grid[0] if len(set(grid)) == 1 else DEFAULT_C, "selected_on": NO_HOLDOUT}
    else:
        by_c: dict[float, float] = {}
        path = None  # the regularisation path, C increasing: each fit starts from the previous C's solution (~10x faster)
        for c in sorted(set(grid)):
            with warnings.catch_warnings():
                # An unconverged candidate is still judged fairly by its holdout accuracy; only the
                # final fit below may warn.
                warnings.simplefilter("ignore", ConvergenceWarning)
                path = _fit_logistic(train_x[fit_idx], train_y[fit_idx], c, seed, warm=path)
            by_c[c] = _percent_correct(path.predict(train_x[holdout_idx]), train_y[holdout_idx])
        best_c = max(by_c, key=lambda c: (by_c[c], -c))  # ties: the smaller C
        chosen = {
            "C": best_c,
            "holdout_top1": by_c[best_c],
            "holdout_rows": int(holdout_idx.size),
            "selected_on": "holdout",
            "holdout_top1_by_C": by_c,
        }

    model = _fit_logistic(train_x, train_y, chosen["C"], seed)
    predicted = model.predict(test_x)  # (N_test,) class indices
    return _result([classes[i] for i in predicted], test_labels, chosen)


def knn(
    train_features,
    train_labels: list[str],
    test_features,
    test_labels: list[str],
    *,
    seed: int = 0,
    holdout_fraction: float = 0.2,
    k_grid: tuple[int, ...] = K_GRID,
) -> BaselineResult:
    """k-nearest-neighbour vote by cosine similarity, k chosen on a held-out part of the training rows.

    Similarity is the dot product of L2-normalised rows (float64). A query's k nearest training rows
    are those with the highest similarity; at the k-th place, equally similar rows are taken in
    training-row order. Each neighbour casts one vote for its class; the class with most votes wins,
    ties go to the class whose voting neighbours have the larger summed similarity, then to the class
    name that sorts first.

    k is chosen from ``k_grid`` (each value cut to the number of rows in the fit part) by top-1 of the
    fit part's vote on the held-out part of `stratified_holdout_split`. Ties go to the smaller k: with
    few rows per class many k vote identically on the holdout (one fit row per class makes every k a
    1-NN), and the smallest of them is the rule the holdout actually exercised. The final vote uses
    all training rows with the chosen k.

    Args:
        train_features: (N_train, D) float array or CPU tensor, rows L2-normalised (normalised again here).
        train_labels: N_train class labels; at least two distinct ones.
        test_features: (N_test, D), same D.
        test_labels: N_test class labels, possibly including classes absent from training.
        seed: seeds the holdout split (the vote itself has no randomness).
        holdout_fraction: share of each class (with >= 2 rows) held out for choosing k, in (0, 1).
        k_grid: the candidate neighbour counts (positive ints); a single value is used as is when nothing
            can be held out.

    Returns:
        A `BaselineResult`; ``chosen`` holds ``k``, ``selected_on`` and, when a holdout was used,
        ``holdout_top1``, ``holdout_rows`` and ``holdout_top1_by_k``.

    Raises:
        ValueError: on empty or mismatched inputs, fewer than two training classes, non-finite or
            all-zero feature rows, a holdout_fraction outside (0, 1) or an empty / non-positive k_grid.
    """
    if not k_grid or not all(isinstance(k, (int, np.integer)) and not isinstance(k, bool) and k >= 1 for k in k_grid):
        raise ValueError(f"k_grid must hold positive ints, got {tuple(k_grid)!r}")
    train_x, train_y, classes, test_x = _prepare(train_features, train_labels, test_features, test_labels, holdout_fraction)

    fit_idx, holdout_idx = stratified_holdout_split(train_labels, holdout_fraction=holdout_fraction, seed=seed)
    if holdout_idx.size == 0:
        chosen: dict[str, Any] = {"k": int(k_grid[0]) if len(set(k_grid)) == 1 else DEFAULT_K, "selected_on": NO_HOLDOUT}
    else:
        by_k: dict[int, float] = {}
        for k in sorted({min(int(k), fit_idx.size) for k in k_grid}):
            predicted = _knn_predict(train_x[fit_idx], train_y[fit_idx], len(classes), train_x[holdout_idx], k)
            by_k[k] = _percent_correct(predicted, train_y[holdout_idx])
        best_k = max(by_k, key=lambda k: (by_k[k], -k))  # ties: the smaller k
        chosen = {
            "k": best_k,
            "holdout_top1": by_k[best_k],
            "holdout_rows": int(holdout_idx.size),
            "selected_on": "holdout",
            "holdout_top1_by_k": by_k,
        }

    predicted = _knn_predict(train_x, train_y, len(classes), test_x, min(chosen["k"], train_x.shape[0]))
    return _result([classes[i] for i in predicted], test_labels, chosen)


def stratified_holdout_split(labels: Sequence[str], *, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split row indices into (fit, holdout), holding out about ``holdout_fraction`` of every class.

    A class with n >= 2 rows gives ``min(n - 1, max(1, round_half_up(holdout_fraction * n)))`` rows,
    drawn by a generator seeded with ``seed`` (classes visited in sorted order); a class with a single
    row stays whole in the fit part, so every class of ``labels`` is in the fit part. Both index arrays
    are sorted; the holdout is empty when every class has one row.

    Raises:
        ValueError: on a holdout_fraction outside (0, 1).
    """
    _check_fraction(holdout_fraction)
    y = np.asarray(labels, dtype=object)  # (N,)
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for name in sorted(set(labels)):
        members = np.flatnonzero(y == name)
        if members.size >= 2:
            n_held = min(members.size - 1, max(1, math.floor(holdout_fraction * members.size + 0.5)))
            held.append(rng.permutation(members)[:n_held])
    holdout = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    fit = np.setdiff1d(np.arange(len(labels)), holdout)
    return fit.astype(np.int64), holdout.astype(np.int64)


def _fit_logistic(x: np.ndarray, y: np.ndarray, c: float, seed: int, warm=None):
    """A fitted LogisticRegression at `c`; `warm` (a previous fit on the same rows) starts it from that solution."""
    from sklearn.linear_model import LogisticRegression  # imported here: sklearn is slow to import

    if warm is not None:
        return warm.set_params(C=c).fit(x, y)
    return LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER, random_state=seed, warm_start=True).fit(x, y)


def _knn_predict(fit_x: np.ndarray, fit_y: np.ndarray, n_classes: int, query_x: np.ndarray, k: int) -> np.ndarray:
    """(Q,) class index voted by the k nearest of the fit rows for each query row (rules: see `knn`)."""
    n_fit = fit_x.shape[0]
    rows_per_chunk = max(1, _SIM_BYTES // (8 * n_fit))
    out = np.empty(query_x.shape[0], dtype=np.int64)
    for start in range(0, query_x.shape[0], rows_per_chunk):
        sim = query_x[start : start + rows_per_chunk] @ fit_x.T  # (q, N_fit)
        q = sim.shape[0]
        # The k-th largest similarity per row; everything above it is in, ties at it fill the
        # remaining places in training-row order (argpartition alone would pick them arbitrarily).
        kth = -np.partition(-sim, k - 1, axis=1)[:, k - 1 : k]  # (q, 1)
        above = sim > kth  # (q, N_fit)
        at = sim == kth  # (q, N_fit)
        room = k - above.sum(axis=1, keepdims=True)  # (q, 1), >= 1
        chosen = above | (at & (np.cumsum(at, axis=1) <= room))  # (q, N_fit), exactly k per row
        rows, cols = np.nonzero(chosen)  # row-major, so k entries per row in training-row order
        votes = np.zeros((q, n_classes))  # (q, C)
        summed = np.zeros((q, n_classes))  # (q, C)
        np.add.at(votes, (rows, fit_y[cols]), 1.0)
        np.add.at(summed, (rows, fit_y[cols]), sim[rows, cols])
        tied = votes == votes.max(axis=1, keepdims=True)  # (q, C)
        summed = np.where(tied, summed, -np.inf)
        tied &= summed == summed.max(axis=1, keepdims=True)
        out[start : start + q] = tied.argmax(axis=1)  # first True: classes are indexed in sorted-name order
    return out


def _prepare(train_features, train_labels, test_features, test_labels, holdout_fraction):
    """Check the inputs and return unit-row float64 features, class indices and the sorted class names.

    Returns (train_x (N_train, D), train_y (N_train,) index into classes, classes, test_x (N_test, D)).
    """
    _check_fraction(holdout_fraction)
    train_x = _unit_rows(train_features, "train_features")  # (N_train, D)
    test_x = _unit_rows(test_features, "test_features")  # (N_test, D)
    if train_x.shape[0] != len(train_labels):
        raise ValueError(f"train_features has {train_x.shape[0]} rows but train_labels has {len(train_labels)} labels")
    if test_x.shape[0] != len(test_labels):
        raise ValueError(f"test_features has {test_x.shape[0]} rows but test_labels has {len(test_labels)} labels")
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train_features has dimension {train_x.shape[1]} but test_features has {test_x.shape[1]}")
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError(f"a classifier needs at least 2 training classes, got {len(classes)}: {classes!r}")
    index = {name: i for i, name in enumerate(classes)}
    train_y = np.array([index[name] for name in train_labels], dtype=np.int64)  # (N_train,)
    return train_x, train_y, classes, test_x


def _unit_rows(features, name: str) -> np.ndarray:
    if hasattr(features, "detach"):  # a torch tensor: leave autograd and low-precision dtypes behind
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (rows, dim) array, got shape {x.shape}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 rows)")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has dimension 0")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} holds non-finite values")
    norms = np.linalg.norm(x, axis=1, keepdims=True)  # (N, 1)
    if (norms == 0).any():
        raise ValueError(f"{name} row {int(np.flatnonzero(norms[:, 0] == 0)[0])} is all zeros and has no direction")
    return x / norms


def _check_fraction(holdout_fraction: float) -> None:
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction!r}")


def _percent_correct(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(100.0 * np.mean(predicted == truth))


def classification_scores(predictions: Sequence[str], test_labels: Sequence[str]) -> tuple[float, float, dict[str, float]]:
    """(top1 %, macro_top1 %, {class: accuracy %}) of predicted vs true labels, every test class counted."""
    correct = np.array([p == t for p, t in zip(predictions, test_labels)])  # (N_test,)
    truth = np.asarray(test_labels, dtype=object)
    per_class = {name: float(100.0 * correct[truth == name].mean()) for name in sorted(set(test_labels))}
    return float(100.0 * correct.mean()), float(np.mean(list(per_class.values()))), per_class


def _result(predictions: list[str], test_labels: Sequence[str], chosen: dict[str, Any]) -> BaselineResult:
    top1, macro, per_class = classification_scores(predictions, test_labels)
    return BaselineResult(predictions=predictions, top1=top1, macro_top1=macro, per_class_accuracy=per_class, chosen=chosen)
