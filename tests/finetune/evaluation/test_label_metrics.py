"""Label-aware metrics against hand-computed examples: zero-shot classification, class-level retrieval
(precision@K, mAP@K, image->image precision), per-class recall and head/medium/tail means."""

from __future__ import annotations

import pytest
import torch

from finetune.evaluation.metrics import (
    class_prompt_embedding,
    class_retrieval_metrics,
    classification_metrics,
    group_means,
    per_class_t2i_recall,
    precision_and_ap_at_k,
    retrieval_ranks,
)

E = torch.eye(3)  # three orthogonal directions: class c lives on axis c


def test_prompt_ensemble_is_the_normalised_mean_of_normalised_prompts():
    prompts = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # one class, two prompts of different norms
    assert class_prompt_embedding(prompts)[0].tolist() == pytest.approx([2**-0.5, 2**-0.5])


def test_classification_top1_top5_and_macro_by_hand():
    images = torch.stack([E[0], E[0], E[0], E[1], 0.9 * E[0] + 0.1 * E[2]])  # last image (class 2) looks like class 0
    labels = torch.tensor([0, 0, 0, 1, 2])
    out, per_class = classification_metrics(images, E, labels, ks=(1, 5))
    assert out["top1"] == pytest.approx(80.0)  # 4 of 5
    assert "top5" not in out  # only 3 classes
    assert per_class == pytest.approx([100.0, 100.0, 0.0])
    assert out["macro_top1"] == pytest.approx(200 / 3)  # the rare class counts as much as the frequent one
    out2, _ = classification_metrics(images, E, labels, ks=(1, 2))
    assert out2["top2"] == pytest.approx(100.0)


def test_precision_and_ap_at_k_by_hand():
    relevant = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    precision, ap = precision_and_ap_at_k(relevant, 3, torch.tensor([2, 1]))
    assert precision.tolist() == pytest.approx([2 / 3, 0.0])
    # query 0: hits at 1 and 3 -> (1/1 + 2/3) / min(3, 2); query 1: none in the top 3
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.0])


def test_class_retrieval_by_hand():
    images = torch.stack([E[0], 0.8 * E[0] + 0.2 * E[1], E[1], 0.6 * E[1] + 0.4 * E[0]])
    image_class = torch.tensor([0, 0, 1, 1])
    queries = torch.stack([E[0], E[1]])  # one prompt per class
    out = class_retrieval_metrics(queries, torch.tensor([0, 1]), images, image_class, ks=(1, 2))
    # class 0 query ranks images 0, 1, 3, 2: P@2 = 1; class 1 query ranks 2, 3, 1, 0: P@2 = 1
    assert out["t2i_P@1"] == 100.0 and out["t2i_P@2"] == 100.0 and out["t2i_mAP@2"] == 100.0
    # image->image, itself excluded: image 1's nearest other is 0 (same class); image 3's is 2 (same)...
    sims = torch.nn.functional.normalize(images, dim=-1)
    sim = sims @ sims.T
    sim.fill_diagonal_(-2)
    nearest = sim.argmax(1)
    expected = (image_class[nearest] == image_class).double().mean().item() * 100
    assert out["i2i_P@1"] == pytest.approx(expected)


def test_per_class_recall_and_group_means():
    images = torch.stack([E[0], E[1], E[2]])
    texts = torch.stack([E[0], E[0], E[2]])  # caption 1 (of image 1) points at image 0: a miss
    ranks = retrieval_ranks(images, texts, torch.tensor([0, 1, 2]))
    recall = per_class_t2i_recall(ranks["t2i"], torch.tensor([0, 1, 1]), 3)
    assert recall == [100.0, 50.0, None]
    groups = {"x": "head", "y": "tail", "z": "tail"}
    assert group_means({"x": 100.0, "y": 50.0, "z": None}, groups) == {"head": 100.0, "tail": 50.0}
