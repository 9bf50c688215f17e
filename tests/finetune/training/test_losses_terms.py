"""The loss terms of `loss.terms` against hand computations written with explicit loops (float64),
the shared masking (planted duplicates change nothing once masked), HN-NCE at beta = 0 == InfoNCE
bit for bit, SigLIP's learned temperature and bias, and the gradient reversal layer."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finetune.training.losses import (
    ClipInfoNCE,
    CompositeLoss,
    Features,
    HardnessWeightedInfoNCE,
    MarginRanking,
    MaxViolationTriplet,
    ModalityAdversarial,
    SemiHardTriplet,
    SigLIPLoss,
    negatives_mask,
)

LOG_SCALE = math.log(10.0)


def features(n: int = 6, d: int = 5, seed: int = 0) -> Features:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    return Features(image=image, text=text, logit_scale=torch.tensor(LOG_SCALE))


def sims(f: Features) -> list[list[float]]:
    """Cosine similarities as plain floats: s[i][j] = <image i, caption j>."""
    n = len(f.image)
    return [[float(f.image[i].double() @ f.text[j].double()) for j in range(n)] for i in range(n)]


def hand_negatives(image_index, label_id, same_label_negatives: bool):
    """neg[i] = the j that are negatives of pair i, by the rules written out."""
    n = len(image_index)
    out = []
    for i in range(n):
        row = []
        for j in range(n):
            if j == i or image_index[j] == image_index[i]:
                continue
            if not same_label_negatives and label_id[i] >= 0 and label_id[j] == label_id[i]:
                continue
            row.append(j)
        out.append(row)
    return out


IMAGE_INDEX = [0, 0, 1, 2, 3, 4]  # rows 0 and 1: two captions of one image
LABEL_ID = [0, 0, 1, 1, -1, 2]  # rows 2 and 3 share class 1; row 4 unlabelled


def batch(label: bool = True) -> dict[str, torch.Tensor]:
    b = {"image_index": torch.tensor(IMAGE_INDEX)}
    if label:
        b["label_id"] = torch.tensor(LABEL_ID)
    return b


# ----------------------------------------------------------------------------- hand references


def hand_siglip(s, neg, t, b):
    n = len(s)
    total = 0.0
    for i in range(n):
        total += -math.log(1 / (1 + math.exp(-(t * s[i][i] + b))))
        for j in neg[i]:
            total += -math.log(1 / (1 + math.exp(t * s[i][j] + b)))
    return total / n


def hand_vsepp(s, neg, margin):
    n = len(s)
    total = 0.0
    for i in range(n):
        if neg[i]:
            total += max(0.0, margin - s[i][i] + max(s[i][j] for j in neg[i]))  # image i, hardest caption
            total += max(0.0, margin - s[i][i] + max(s[j][i] for j in neg[i]))  # caption i, hardest image
    return total / n


def hand_semihard(s, neg, margin):
    n = len(s)
    total = 0.0
    for i in range(n):
        for row in ([s[i][j] for j in neg[i]], [s[j][i] for j in neg[i]]):  # image anchor, caption anchor
            if not row:
                continue
            farther = [v for v in row if v < s[i][i]]
            chosen = max(farther) if farther else min(row)  # fallback: the easiest negative
            total += max(0.0, margin - s[i][i] + chosen)
    return total / n


def hand_margin_ranking(s, neg, margin):
    n = len(s)
    total = 0.0
    for i in range(n):
        for j in neg[i]:
            total += max(0.0, margin - s[i][i] + s[i][j]) + max(0.0, margin - s[i][i] + s[j][i])
    return total / n


def hand_hn_infonce(s, neg, scale, beta, weights=None):
    n = len(s)
    i2t, t2i = [], []
    for i in range(n):
        for row, out in (([s[i][j] for j in neg[i]], i2t), ([s[j][i] for j in neg[i]], t2i)):
            pos = math.exp(scale * s[i][i])
            if row:
                imp = [math.exp(beta * scale * v) for v in row]
                w = [len(row) * x / sum(imp) for x in imp]
                denominator = pos + sum(wj * math.exp(scale * v) for wj, v in zip(w, row))
            else:
                denominator = pos
            out.append(-math.log(pos / denominator))
    w = weights or [1.0] * n
    return 0.5 * (sum(a * b for a, b in zip(w, i2t)) / n + sum(a * b for a, b in zip(w, t2i)) / n)


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize("same_label_negatives", [True, False])
def test_each_term_equals_its_hand_computation(same_label_negatives):
    f = features()
    s = sims(f)
    neg = hand_negatives(IMAGE_INDEX, LABEL_ID, same_label_negatives)
    b = batch()
    kw = dict(same_label_negatives=same_label_negatives)
    siglip = SigLIPLoss(temperature_init=3.0, bias_init=-1.5, **kw)
    got = {
        "siglip": siglip(f, b)["siglip"],
        "vsepp": MaxViolationTriplet(0.3, **kw)(f, b)["vsepp"],
        "semihard": SemiHardTriplet(0.3, **kw)(f, b)["semihard"],
        "margin_ranking": MarginRanking(0.3, **kw)(f, b)["margin_ranking"],
        "hn_infonce": HardnessWeightedInfoNCE(0.7, max_logit_scale=100.0, class_weights=None, **kw)(f, b)["hn_infonce"],
    }
    want = {
        "siglip": hand_siglip(s, neg, 3.0, -1.5),
        "vsepp": hand_vsepp(s, neg, 0.3),
        "semihard": hand_semihard(s, neg, 0.3),
        "margin_ranking": hand_margin_ranking(s, neg, 0.3),
        "hn_infonce": hand_hn_infonce(s, neg, 10.0, 0.7),
    }
    for name in want:
        assert got[name].item() == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
        assert want[name] > 0.05, name  # not a trivially zero example


def test_hn_infonce_honours_class_weights_like_infonce():
    f = features()
    s = sims(f)
    neg = hand_negatives(IMAGE_INDEX, LABEL_ID, True)
    weights = [0.5, 2.0, 1.5]
    per_pair = [1.0 if c < 0 else weights[c] for c in LABEL_ID]
    loss = HardnessWeightedInfoNCE(0.7, max_logit_scale=100.0, same_label_negatives=True, class_weights=torch.tensor(weights))
    assert loss(f, batch())["hn_infonce"].item() == pytest.approx(hand_hn_infonce(s, neg, 10.0, 0.7, per_pair), rel=1e-5)


def test_semihard_falls_back_to_the_easiest_negative_when_every_negative_is_harder():
    # One pair whose positive is the least similar caption: no semi-hard negative exists.
    image = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[-1.0, 0.2], [0.0, 1.0], [1.0, 0.9]]), dim=-1)
    f = Features(image=image, text=text, logit_scale=torch.tensor(0.0))
    s = sims(f)
    assert all(s[0][j] > s[0][0] for j in (1, 2))  # every negative of image 0 is harder
    got = SemiHardTriplet(0.1, same_label_negatives=True)(f, {"image_index": torch.arange(3)})["semihard"]
    assert got.item() == pytest.approx(hand_semihard(s, hand_negatives([0, 1, 2], [-1] * 3, True), 0.1), rel=1e-6)
    # the fallback picked the easiest (min) negative: image 0's term is margin - s00 + min(s01, s02)
    assert min(s[0][1], s[0][2]) < max(s[0][1], s[0][2])


def test_hn_infonce_at_beta_zero_is_infonce_bit_for_bit():
    for seed, same_label in ((0, True), (1, False), (2, True)):
        f = features(n=7, seed=seed)
        b = {"image_index": torch.tensor([0, 0, 1, 2, 3, 4, 4]), "label_id": torch.tensor([0, 0, 1, 1, -1, 2, 2])}
        weights = torch.tensor([0.5, 2.0, 1.5])
        plain = ClipInfoNCE(100.0, same_label_negatives=same_label, class_weights=weights)(f, b)["contrastive"]
        hard = HardnessWeightedInfoNCE(0.0, max_logit_scale=100.0, same_label_negatives=same_label, class_weights=weights)(f, b)
        assert torch.equal(hard["hn_infonce"], plain)
    # and beta > 0 does move it
    f = features(n=7, seed=0)
    b = {"image_index": torch.arange(7)}
    plain = ClipInfoNCE(100.0, same_label_negatives=True)(f, b)["contrastive"]
    hard = HardnessWeightedInfoNCE(1.0, max_logit_scale=100.0, same_label_negatives=True, class_weights=None)(f, b)["hn_infonce"]
    assert abs(hard.item() - plain.item()) > 1e-3


# ----------------------------------------------------------------------------- masking


def all_terms(same_label_negatives: bool) -> dict[str, torch.nn.Module]:
    kw = dict(same_label_negatives=same_label_negatives)
    return {
        "infonce": ClipInfoNCE(100.0, **kw),
        "hn_infonce": HardnessWeightedInfoNCE(0.5, max_logit_scale=100.0, class_weights=None, **kw),
        "siglip": SigLIPLoss(10.0, -10.0, **kw),
        "vsepp": MaxViolationTriplet(0.2, **kw),
        "semihard": SemiHardTriplet(0.2, **kw),
        "margin_ranking": MarginRanking(0.2, **kw),
    }


def value(module, f, b) -> float:
    (v,) = module(f, b).values()
    return v.item()


def planted(theta: float) -> Features:
    """5 pairs in 6-D; dims 4 and 5 are used only by image 0 and caption 1, so rotating image 0 in that
    plane changes <image 0, caption 1> and no other similarity (image 0 keeps its norm). At theta = 0
    caption 1 is as close to image 0 as a duplicate of its own caption would be: a planted positive."""
    g = torch.Generator().manual_seed(2)
    image, text = torch.randn(5, 6, generator=g), torch.randn(5, 6, generator=g)
    image[:, 4:] = 0
    text[:, 4:] = 0
    image[0, 4], image[0, 5] = 2.0 * math.cos(theta), 2.0 * math.sin(theta)
    text[1, 4], text[1, 5] = 1.5, 0.0
    return Features(image=F.normalize(image, dim=-1), text=F.normalize(text, dim=-1), logit_scale=torch.tensor(LOG_SCALE))


def test_the_planted_pair_is_the_only_similarity_that_moves():
    diff = (planted(0.0).image @ planted(0.0).text.T - planted(2.5).image @ planted(2.5).text.T).abs()
    assert diff[0, 1] > 0.3
    diff[0, 1] = 0
    assert diff.max() < 1e-6


@pytest.mark.parametrize(
    "masked_batch, same_label_negatives",
    [
        ({"image_index": torch.tensor([0, 0, 1, 2, 3])}, True),  # caption 1 is another caption of image 0
        ({"image_index": torch.arange(5), "label_id": torch.tensor([7, 7, 1, 2, -1])}, False),  # pairs 0, 1: one class
    ],
    ids=["same_image", "same_label"],
)
def test_a_planted_positive_changes_nothing_once_masked(masked_batch, same_label_negatives):
    unmasked = {"image_index": torch.arange(5), "label_id": torch.arange(5)}  # every pair its own image and class
    near, far = planted(0.0), planted(2.5)
    for name, module in all_terms(same_label_negatives).items():
        assert value(module, near, masked_batch) == pytest.approx(value(module, far, masked_batch), abs=1e-6), name
        if name != "semihard":  # semi-hard skips negatives harder than the positive, by design
            assert abs(value(module, near, unmasked) - value(module, far, unmasked)) > 1e-4, name


def test_negatives_mask_follows_the_written_rules():
    for same_label in (True, False):
        mask = negatives_mask(batch(), same_label_negatives=same_label)
        want = hand_negatives(IMAGE_INDEX, LABEL_ID, same_label)
        assert [torch.nonzero(row).flatten().tolist() for row in mask] == want
        assert torch.equal(mask, mask.T)
    with pytest.raises(ValueError, match="same_label_negatives"):
        negatives_mask({"image_index": torch.arange(3)}, same_label_negatives=False)


# ----------------------------------------------------------------------------- parameters and gradients


def test_siglip_temperature_and_bias_start_at_the_papers_values_and_get_gradients():
    loss = SigLIPLoss(10.0, -10.0, same_label_negatives=True)
    assert loss.log_temperature.item() == pytest.approx(math.log(10.0)) and loss.bias.item() == -10.0
    assert {n for n, p in loss.named_parameters() if p.requires_grad} == {"log_temperature", "bias"}
    f = features()
    loss(f, batch())["siglip"].backward()
    assert loss.log_temperature.grad.item() != 0 and loss.bias.grad.item() != 0
    # CLIP's logit_scale plays no part
    f2 = Features(image=f.image, text=f.text, logit_scale=torch.tensor(4.0))
    assert loss(f2, batch())["siglip"].item() == loss(f, batch())["siglip"].item()


def test_gradient_reversal_hands_the_towers_the_negated_discriminator_gradient():
    f = features(n=5, d=8, seed=5)
    image, text = f.image.clone().requires_grad_(True), f.text.clone().requires_grad_(True)
    term = ModalityAdversarial(embed_dim=8, hidden_dim=16, reversal=0.7, seed=0)
    out = term(Features(image=image, text=text, logit_scale=f.logit_scale), {"image_index": torch.arange(5)})
    out["adversarial"].backward()
    disc_grads = [p.grad.clone() for p in term.discriminator.parameters()]
    term.zero_grad()

    # The discriminator's own loss, without the reversal layer: its gradient w.r.t. the embeddings.
    z = torch.cat([f.image, f.text]).clone().requires_grad_(True)
    logits = term.discriminator(z).squeeze(-1)
    target = torch.cat([torch.ones(5), torch.zeros(5)])
    F.binary_cross_entropy_with_logits(logits, target).backward()
    torch.testing.assert_close(torch.cat([image.grad, text.grad]), -0.7 * z.grad, rtol=1e-6, atol=1e-8)
    assert z.grad.abs().sum() > 0
    # The discriminator itself descends its loss (not reversed): same gradient as the plain computation.
    term.zero_grad()
    F.binary_cross_entropy_with_logits(term.discriminator(torch.cat([f.image, f.text])).squeeze(-1), target).backward()
    for got, want in zip(disc_grads, [p.grad for p in term.discriminator.parameters()]):
        torch.testing.assert_close(got, want)
    assert 0.0 <= term.log_values()["adversarial_accuracy"] <= 1.0


def test_adversarial_discriminator_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = ModalityAdversarial(8, 16, 1.0, seed=4)
    after = torch.rand(1)
    b = ModalityAdversarial(8, 16, 1.0, seed=4)
    assert torch.equal(before, after)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_composite_returns_each_weighted_term_by_name_and_their_sum_is_the_loss():
    f = features()
    b = batch()
    siglip = SigLIPLoss(10.0, -10.0, same_label_negatives=True)
    composite = CompositeLoss(
        {
            "infonce": (ClipInfoNCE(100.0, same_label_negatives=True), 1.0),
            "siglip": (siglip, 0.5),
            "vsepp": (MaxViolationTriplet(0.2, same_label_negatives=True), 2.0),
        },
        same_label_negatives=True,
    )
    terms = composite(f, b)
    assert list(terms) == ["infonce", "siglip", "vsepp"]
    assert terms["siglip"].item() == pytest.approx(0.5 * siglip(f, b)["siglip"].item())
    assert terms["vsepp"].item() == pytest.approx(2.0 * MaxViolationTriplet(0.2, same_label_negatives=True)(f, b)["vsepp"].item())
    assert {n for n, _ in composite.named_parameters()} == {"terms.siglip.log_temperature", "terms.siglip.bias"}
    # 6 pairs; pairs 0 and 1 share an image: 4 negatives each, the others 5 -> 28 / 6
    assert composite.negatives_per_pair() == pytest.approx(28 / 6)


def test_terms_run_in_float32_under_autocast():
    f = features()
    composite = CompositeLoss({"siglip": (SigLIPLoss(10.0, -10.0, same_label_negatives=True), 1.0)}, same_label_negatives=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = composite(f, batch())["siglip"]
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(composite(f, batch())["siglip"].item(), rel=1e-6)
