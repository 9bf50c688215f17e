"""Linear-probe and k-NN baselines on frozen features against hand-written references: sklearn fitted
directly, a brute-force k-NN with the stated tie-breaks, C / k selection recomputed over the grid,
hand-counted accuracies, the 1-shot fallback, input errors and determinism."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from finetune.evaluation.baselines import (
    DEFAULT_C,
    DEFAULT_K,
    MAX_ITER,
    NO_HOLDOUT,
    knn,
    linear_probe,
    stratified_holdout_split,
)

BASELINES = pytest.mark.parametrize("baseline", [linear_probe, knn], ids=["linear_probe", "knn"])
SMALL_C_GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def unit(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clusters(sizes: dict[str, int], dim: int, noise: float, seed: int) -> tuple[np.ndarray, list[str]]:
    """Class i's rows scattered around axis i (unit rows), classes in the order given."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for axis, (name, n) in enumerate(sizes.items()):
        x = np.zeros((n, dim))
        x[:, axis] = 1.0
        rows.append(x + noise * rng.standard_normal((n, dim)))
        labels += [name] * n
    return unit(np.vstack(rows)), labels


def reference_knn(train: np.ndarray, train_labels: list[str], test: np.ndarray, k: int) -> list[str]:
    """One query at a time: k most similar rows (equal similarity: lower row first), majority vote,
    then larger summed similarity, then the class name that sorts first."""
    train, test = unit(train), unit(test)
    out = []
    for q in test:
        sims = [float(np.dot(q, t)) for t in train]
        nearest = sorted(range(len(train)), key=lambda i: (-sims[i], i))[:k]
        votes = Counter(train_labels[i] for i in nearest)
        summed = Counter()
        for i in nearest:
            summed[train_labels[i]] += sims[i]
        out.append(min(votes, key=lambda c: (-votes[c], -summed[c], c)))
    return out


def percent_correct(predicted: list[str], truth: list[str]) -> float:
    return 100.0 * float(np.mean([p == t for p, t in zip(predicted, truth)]))


# --- cases where the answer is known by construction ------------------------------------------------


@BASELINES
def test_well_separated_clusters_are_classified_perfectly(baseline):
    train_x, train_y = clusters({"cat": 8, "dog": 6, "eel": 5}, dim=6, noise=0.05, seed=0)
    test_x, test_y = clusters({"cat": 4, "dog": 4, "eel": 4}, dim=6, noise=0.05, seed=1)
    out = baseline(train_x, train_y, test_x, test_y)
    assert out.predictions == test_y
    assert out.top1 == out.macro_top1 == 100.0
    assert out.per_class_accuracy == {"cat": 100.0, "dog": 100.0, "eel": 100.0}


def test_c_selection_prefers_the_c_that_separates_a_rare_class():
    # Near C = 0 the weights vanish and the unpenalised intercept predicts the majority class for every
    # held-out row: 4 "a" right, 1 "b" wrong = 80%. A weak penalty separates the clusters: 100%.
    train_x, train_y = clusters({"a": 20, "b": 5}, dim=8, noise=0.1, seed=0)
    for seed in range(3):
        out = linear_probe(train_x, train_y, train_x[:2], train_y[:2], seed=seed, c_grid=(1e-4, 100.0))
        assert out.chosen["holdout_top1_by_C"] == {1e-4: 80.0, 100.0: 100.0}
        assert out.chosen["C"] == 100.0 and out.chosen["holdout_top1"] == 100.0 and out.chosen["holdout_rows"] == 5
    tied = linear_probe(train_x, train_y, train_x[:2], train_y[:2], c_grid=(100.0, 10.0))
    assert tied.chosen["holdout_top1_by_C"] == {10.0: 100.0, 100.0: 100.0}
    assert tied.chosen["C"] == 10.0  # a tie goes to the stronger regularisation


def test_k_selection_prefers_a_wide_vote_when_labels_are_noisy():
    # "a" rows sit around axis 0, each pushed along its own axis; three "b" rows mislabelled exactly on
    # axis 0 are nearer to every "a" row (0.958) than the "a" rows are to each other (0.917). At most
    # 2 of the 12 "b" rows are held out, so a mislabelled row always stays in the fit part: 1-NN gets all
    # 4 held-out "a" rows wrong, a 9-vote gets them right and loses at most the 2 held-out noisy rows.
    dim = 2 + 20 + 9
    axes = iter(range(2, dim))
    a = [unit(np.eye(dim)[0] + 0.3 * np.eye(dim)[next(axes)]) for _ in range(20)]
    b = [unit(np.eye(dim)[1] + 0.3 * np.eye(dim)[next(axes)]) for _ in range(9)] + [np.eye(dim)[0]] * 3
    train_x, train_y = np.vstack(a + b), ["a"] * 20 + ["b"] * 12
    for seed in range(5):
        out = knn(train_x, train_y, train_x[:2], train_y[:2], seed=seed, k_grid=(1, 9))
        by_k = out.chosen["holdout_top1_by_k"]
        assert by_k[1] <= 100.0 * 2 / 6 < 100.0 * 4 / 6 <= by_k[9]
        assert out.chosen["k"] == 9


def test_k_selection_avoids_a_vote_swamped_by_the_majority_class():
    train_x, train_y = clusters({"a": 20, "b": 5}, dim=8, noise=0.1, seed=0)
    out = knn(train_x, train_y, train_x[:2], train_y[:2], k_grid=(1, 3, 50))
    # 50 is cut to the 20 fit rows, where every vote is 16 "a" to 4 "b": the held-out "b" row is lost.
    assert out.chosen["holdout_top1_by_k"] == {1: 100.0, 3: 100.0, 20: 80.0}
    assert out.chosen["k"] == 1  # 1 and 3 tie: the smaller k


# --- equal to hand-written references ----------------------------------------------------------------


def overlapping(seed: int = 0):
    """Three classes whose clusters overlap, so a classifier gets some but not all test rows right."""
    train_x, train_y = clusters({"x": 14, "y": 10, "z": 6}, dim=5, noise=0.8, seed=seed)
    test_x, test_y = clusters({"x": 10, "y": 10, "z": 10}, dim=5, noise=0.8, seed=seed + 100)
    return train_x, train_y, test_x, test_y


def test_linear_probe_equals_sklearn_fitted_directly_with_the_chosen_c():
    train_x, train_y, test_x, test_y = overlapping()
    out = linear_probe(train_x, train_y, test_x, test_y, c_grid=SMALL_C_GRID)
    assert 0.0 < out.top1 < 100.0  # mistakes exist, so equal predictions are a real check
    ref = LogisticRegression(C=out.chosen["C"], solver="lbfgs", max_iter=MAX_ITER, random_state=0).fit(unit(train_x), train_y)
    assert out.predictions == ref.predict(test_x).tolist()
    assert out.top1 == pytest.approx(percent_correct(out.predictions, test_y))


def test_c_selection_equals_a_hand_sweep_over_the_grid():
    train_x, train_y, test_x, test_y = overlapping(seed=3)
    out = linear_probe(train_x, train_y, test_x, test_y, seed=7, c_grid=SMALL_C_GRID)
    fit, held = stratified_holdout_split(train_y, holdout_fraction=0.2, seed=7)
    y = np.array(train_y)
    by_c = {}
    for c in SMALL_C_GRID:
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=MAX_ITER).fit(unit(train_x[fit]), y[fit])
        by_c[c] = percent_correct(model.predict(train_x[held]).tolist(), y[held].tolist())
    best = max(by_c.values())
    assert out.chosen["holdout_top1_by_C"] == pytest.approx(by_c)
    assert out.chosen["C"] == min(c for c in SMALL_C_GRID if by_c[c] == best)
    assert out.chosen["holdout_rows"] == len(held) == 3 + 2 + 1


@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_knn_equals_a_brute_force_reference(k):
    train_x, train_y, test_x, test_y = overlapping()
    out = knn(train_x, train_y, test_x, test_y, k_grid=(k,))
    assert out.chosen["k"] == k
    assert out.predictions == reference_knn(train_x, train_y, test_x, k)
    assert 0.0 < out.top1 < 100.0


def test_k_selection_equals_a_hand_sweep_over_the_grid():
    train_x, train_y, test_x, test_y = overlapping(seed=5)
    grid = (1, 2, 3, 5, 8, 13, 100)
    out = knn(train_x, train_y, test_x, test_y, seed=2, k_grid=grid)
    fit, held = stratified_holdout_split(train_y, holdout_fraction=0.2, seed=2)
    fit_y, held_y = [train_y[i] for i in fit], [train_y[i] for i in held]
    by_k = {min(k, len(fit)): percent_correct(reference_knn(train_x[fit], fit_y, train_x[held], min(k, len(fit))), held_y) for k in grid}
    assert out.chosen["holdout_top1_by_k"] == pytest.approx(by_k)
    assert out.chosen["k"] == min(k for k in by_k if by_k[k] == max(by_k.values()))
    assert out.predictions == reference_knn(train_x, train_y, test_x, out.chosen["k"])


# Exact ties need exact similarities: unit vectors on two axes, 0.6^2 + 0.8^2 = 1.
UP, DOWN, FAR = [0.6, 0.8], [0.6, -0.8], [-1.0, 0.0]


@pytest.mark.parametrize(
    ("rows", "k", "expected"),
    [
        ([("zeta", [1.0, 0.0]), ("alpha", UP)], 2, "zeta"),  # 1 vote each: larger similarity 1.0 > 0.6 wins
        ([("zeta", UP), ("alpha", DOWN)], 2, "alpha"),  # same votes, same summed similarity: name
        ([("zeta", [1.0, 0.0]), ("alpha", UP), ("alpha", DOWN)], 3, "alpha"),  # 2 votes beat the nearest row
        ([("zeta", UP), ("alpha", DOWN)], 1, "zeta"),  # equally near at the k-th place: the earlier row
        ([("alpha", DOWN), ("zeta", UP)], 1, "alpha"),
    ],
)
def test_knn_tie_breaks(rows, k, expected):
    # Filler rows of a third class far away give the holdout something to take without touching the vote.
    labels = [name for name, _ in rows] + ["far"] * 6
    train_x = np.array([x for _, x in rows] + [FAR] * 6)
    query = np.array([[1.0, 0.0]])
    out = knn(train_x, labels, query, [expected], k_grid=(k,))
    assert out.chosen["k"] == k
    assert out.predictions == [expected] == reference_knn(train_x, labels, query, k)


# --- metrics, 1-shot, splits ---------------------------------------------------------------------------


@BASELINES
def test_accuracies_by_hand_on_an_unbalanced_test_set(baseline):
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    train_x, train_y = np.array([e1] * 3 + [e2] * 3), ["a"] * 3 + ["b"] * 3
    # 4 "a" right; "b" 1 of 2 right; "c" has no training row and is always wrong.
    test_x = np.array([e1, e1, e1, e1, e1, e2, e2])
    test_y = ["a", "a", "a", "a", "b", "b", "c"]
    out = baseline(train_x, train_y, test_x, test_y)
    assert out.predictions == ["a", "a", "a", "a", "a", "b", "b"]
    assert out.top1 == pytest.approx(100.0 * 5 / 7)
    assert out.per_class_accuracy == pytest.approx({"a": 100.0, "b": 50.0, "c": 0.0})
    assert out.macro_top1 == pytest.approx(50.0)  # differs from the 71.4% of top1


def test_one_shot_skips_selection_and_uses_the_defaults():
    train_x, train_y = clusters({"a": 1, "b": 1, "c": 1}, dim=4, noise=0.05, seed=0)
    test_x, test_y = clusters({"a": 3, "b": 3, "c": 3}, dim=4, noise=0.05, seed=1)
    probe = linear_probe(train_x, train_y, test_x, test_y)
    assert probe.chosen == {"C": DEFAULT_C, "selected_on": NO_HOLDOUT}
    ref = LogisticRegression(C=DEFAULT_C, solver="lbfgs", max_iter=MAX_ITER).fit(train_x, train_y)
    assert probe.predictions == ref.predict(test_x).tolist() == test_y
    nearest = knn(train_x, train_y, test_x, test_y)
    assert nearest.chosen == {"k": DEFAULT_K, "selected_on": NO_HOLDOUT}
    assert nearest.predictions == test_y
    assert linear_probe(train_x, train_y, test_x, test_y, c_grid=(0.5,)).chosen["C"] == 0.5  # one value: no choice to make


def test_holdout_split_is_stratified_and_keeps_single_rows_in_the_fit_part():
    labels = ["a"] * 10 + ["b"] * 2 + ["c"] + ["d"] * 7
    fit, held = stratified_holdout_split(labels, holdout_fraction=0.2, seed=0)
    assert sorted(np.concatenate([fit, held]).tolist()) == list(range(len(labels)))
    assert Counter(labels[i] for i in held) == {"a": 2, "b": 1, "d": 1}  # round(1.4) = 1, "c" stays
    assert {labels[i] for i in fit} == {"a", "b", "c", "d"}
    other = stratified_holdout_split(labels, holdout_fraction=0.2, seed=1)[1]
    assert held.tolist() == stratified_holdout_split(labels, holdout_fraction=0.2, seed=0)[1].tolist()
    assert Counter(labels[i] for i in other) == Counter(labels[i] for i in held)
    assert stratified_holdout_split(["a", "b", "c"], holdout_fraction=0.5, seed=0)[1].size == 0


# --- inputs and determinism -----------------------------------------------------------------------------

X4 = np.eye(4)
Y4 = ["a", "a", "b", "b"]


@BASELINES
@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((X4, Y4[:3], X4, Y4), {}, "train_features has 4 rows but train_labels has 3"),
        ((X4, Y4, X4, Y4 + ["a"]), {}, "test_features has 4 rows but test_labels has 5"),
        ((X4, ["a"] * 4, X4, Y4), {}, "at least 2 training classes, got 1"),
        ((np.zeros((0, 4)), [], X4, Y4), {}, "train_features is empty"),
        ((X4, Y4, np.zeros((0, 4)), []), {}, "test_features is empty"),
        ((X4, Y4, np.ones((2, 3)), ["a", "b"]), {}, "dimension 4 but test_features has 3"),
        ((X4[0], Y4, X4, Y4), {}, "train_features must be a 2-D"),
        ((np.vstack([X4[:3], np.zeros(4)]), Y4, X4, Y4), {}, "row 3 is all zeros"),
        ((X4, Y4, np.full((4, 4), np.nan), Y4), {}, "test_features holds non-finite"),
        ((X4, Y4, X4, Y4), {"holdout_fraction": 1.0}, "holdout_fraction must be in"),
    ],
)
def test_bad_inputs_raise_value_errors_that_name_the_problem(baseline, args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        baseline(*args, **kwargs)


@pytest.mark.parametrize(
    ("baseline", "grid"),
    [(linear_probe, {"c_grid": ()}), (linear_probe, {"c_grid": (1.0, 0.0)}), (knn, {"k_grid": ()}), (knn, {"k_grid": (3, 0)})],
)
def test_bad_grids_raise(baseline, grid):
    with pytest.raises(ValueError, match="grid must hold positive"):
        baseline(X4, Y4, X4, Y4, **grid)


@BASELINES
def test_same_seed_same_result_and_inputs_in_any_form(baseline):
    train_x, train_y, test_x, test_y = overlapping()
    first = baseline(train_x, train_y, test_x, test_y, seed=4)
    assert baseline(train_x, train_y, test_x, test_y, seed=4) == first
    # Torch tensors and rows of any length give the same answer: rows are normalised inside.
    scaled = torch.from_numpy(train_x * np.linspace(0.5, 3.0, len(train_x))[:, None])
    again = baseline(scaled, train_y, torch.from_numpy(test_x * 7.0), test_y, seed=4)
    assert again.predictions == first.predictions and again.chosen["holdout_top1"] == first.chosen["holdout_top1"]
