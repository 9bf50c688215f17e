"""Per-class weights for the contrastive loss on long-tailed data, normalised to mean 1 over the data.

    inverse_frequency   w_c ~ 1 / n_c
    effective_number    w_c ~ (1 - beta) / (1 - beta ** n_c)     (Cui et al., CVPR 2019)

n_c counts the rows (image-caption pairs) of class c. The weights are scaled so that the mean weight
over all rows is 1 (sum_c n_c w_c = N): the loss keeps its scale, and the learning rate that suited
unweighted InfoNCE still suits the weighted one. The loss applies w of each pair's class to that
pair's two InfoNCE terms (finetune/training/losses.py).
"""

from __future__ import annotations

from data_tools.sampling import class_counts

CLASS_WEIGHT_METHODS = ("inverse_frequency", "effective_number")


def class_weights(labels: list[str], method: str, beta: float) -> dict[str, float]:
    """{class: weight} for `method`; `beta` in [0, 1) only matters for effective_number."""
    if method not in CLASS_WEIGHT_METHODS:
        raise ValueError(f"unknown class weight method {method!r}; use one of {', '.join(CLASS_WEIGHT_METHODS)}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}")
    counts = class_counts(labels)
    if not counts:
        raise ValueError("class weights need at least one labelled row")
    if method == "inverse_frequency":
        raw = {c: 1.0 / n for c, n in counts.items()}
    else:
        raw = {c: (1.0 - beta) / (1.0 - beta**n) for c, n in counts.items()}
    scale = len(labels) / sum(n * raw[c] for c, n in counts.items())  # mean over rows = 1
    return {c: w * scale for c, w in raw.items()}
