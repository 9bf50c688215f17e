"""Label-aware InfoNCE: class weights per pair and same-label masking equal a hand computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.training.losses import ClipInfoNCE, Features


def _setup(n=6, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return Features(image=image, text=text, logit_scale=torch.tensor(math.log(10.0)))


def _hand(features, image_index, label_id, weights, same_label_negatives):
    """Row by row: row i's denominator holds i and every j that is neither its image nor (masking on) its class."""
    sim = 10.0 * features.image.double() @ features.text.double().T  # (N, N)
    n = len(image_index)
    i2t, t2i = [], []
    for i in range(n):
        keep = []
        for j in range(n):
            same = image_index[j] == image_index[i] or (not same_label_negatives and label_id[i] >= 0 and label_id[j] == label_id[i])
            if j == i or not same:
                keep.append(j)
        i2t.append(-(sim[i, i] - torch.logsumexp(sim[i, keep], 0)))
        t2i.append(-(sim[i, i] - torch.logsumexp(sim[keep, i], 0)))
    w = [1.0 if label_id[i] < 0 else weights[label_id[i]] for i in range(n)]
    return 0.5 * (sum(wi * a for wi, a in zip(w, i2t)) / n + sum(wi * b for wi, b in zip(w, t2i)) / n)


@pytest.mark.parametrize("same_label_negatives", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
def test_weighted_and_masked_infonce_equals_hand_computation(same_label_negatives, weighted):
    features = _setup()
    image_index = [0, 0, 1, 2, 3, 4]  # rows 0 and 1: two captions of one image
    label_id = [0, 0, 1, 1, -1, 2]  # rows 2 and 3 share class 1; row 4 unlabelled (replay)
    weights = [0.5, 2.0, 1.5] if weighted else [1.0, 1.0, 1.0]
    loss = ClipInfoNCE(same_label_negatives=same_label_negatives, class_weights=torch.tensor(weights) if weighted else None)
    got = loss(features, {"image_index": torch.tensor(image_index), "label_id": torch.tensor(label_id)})["contrastive"]
    want = _hand(features, image_index, label_id, weights, same_label_negatives)
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_masking_changes_the_loss_and_counts_the_negatives_left():
    features = _setup()
    batch = {"image_index": torch.tensor([0, 1, 2, 3, 4, 5]), "label_id": torch.tensor([0, 0, 0, 1, 1, 2])}
    plain, masked = ClipInfoNCE(), ClipInfoNCE(same_label_negatives=False)
    a, b = plain(features, batch)["contrastive"], masked(features, batch)["contrastive"]
    assert not torch.isclose(a, b)
    assert plain.negatives_per_pair() == 5.0
    # class 0: 3 rows with 3 negatives each, class 1: 2 rows with 4, class 2: 1 row with 5 -> 22 / 6
    assert masked.negatives_per_pair() == pytest.approx(22 / 6)


def test_label_options_without_labels_say_which_key_needs_them():
    features = _setup()
    with pytest.raises(ValueError, match="same_label_negatives"):
        ClipInfoNCE(same_label_negatives=False)(features, {"image_index": torch.arange(6)})
    with pytest.raises(ValueError, match="class_weights"):
        ClipInfoNCE(class_weights=torch.ones(2))(features, {"image_index": torch.arange(6)})
