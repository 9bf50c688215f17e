"""Tests for finetune.training.losses.ClipInfoNCE on (features, batch): hand-computed values, same-image masking,
the temperature clamp, gradients, and (2 gloo processes) the step's cross-process gather's gradients."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from finetune.training.losses import ClipInfoNCE, Features
from finetune.training.step import gather_rows, gather_with_grad


def _features(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


def _infonce(image, text, log_scale, image_index) -> torch.Tensor:
    """The loss as the step calls it: unit float32 features, the batch's image_index."""
    features = Features(
        image=F.normalize(image.float(), dim=-1), text=F.normalize(text.float(), dim=-1), logit_scale=torch.as_tensor(log_scale)
    )
    return ClipInfoNCE()(features, {"image_index": torch.as_tensor(image_index)})["contrastive"]


def _loss(image, text, log_scale, image_index) -> torch.Tensor:
    return _infonce(image, text, torch.as_tensor(log_scale, dtype=torch.float64), image_index)


def _hand_loss(image, text, scale, image_index) -> torch.Tensor:
    """Symmetric InfoNCE written out row by row: row i's denominator holds i itself and every j of a
    different image; captions of the same image are dropped."""
    image = image / image.norm(dim=-1, keepdim=True)
    text = text / text.norm(dim=-1, keepdim=True)
    sim = scale * image.double() @ text.double().T  # (N, N) image rows, caption columns
    n = len(image_index)
    i2t, t2i = [], []
    for i in range(n):
        allowed = [j for j in range(n) if j == i or image_index[j] != image_index[i]]
        i2t.append(torch.logsumexp(sim[i, allowed], 0) - sim[i, i])
        t2i.append(torch.logsumexp(sim[allowed, i], 0) - sim[i, i])
    return 0.5 * (torch.stack(i2t).mean() + torch.stack(t2i).mean())


def test_equals_symmetric_cross_entropy_computed_by_hand():
    image, text = _features(5, 8, seed=0)
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    log_scale = math.log(20.0)
    got = _loss(image, text, log_scale, torch.arange(5))
    s = 20.0
    targets = torch.arange(5)
    expected = 0.5 * (F.cross_entropy(s * image @ text.T, targets) + F.cross_entropy(s * text @ image.T, targets))
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    # Sanity: the value is far from trivial (log 5 would be the loss of uninformative logits).
    assert abs(got.item() - math.log(5)) > 1e-2


def test_captions_of_the_same_image_are_not_negatives():
    image, text = _features(4, 6, seed=1)
    image_index = [0, 0, 1, 2]
    got = _loss(image, text, math.log(10.0), image_index)
    expected = _hand_loss(image, text, 10.0, image_index)
    torch.testing.assert_close(got, expected.float(), atol=1e-5, rtol=1e-5)
    # And this differs from the unmasked loss, so the mask really changed something.
    unmasked = _loss(image, text, math.log(10.0), [0, 1, 2, 3])
    assert abs(got.item() - unmasked.item()) > 1e-3


def _rotated_pair_batch(theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """4 pairs in 6-D; dims 4 and 5 are used only by image 0 and text 1, so rotating image 0 in that
    plane changes <image 0, text 1> and no other similarity (and keeps image 0's norm)."""
    image, text = _features(4, 6, seed=2)
    image[:, 4:] = 0
    text[:, 4:] = 0
    image[0, 4], image[0, 5] = 2.0 * math.cos(theta), 2.0 * math.sin(theta)
    text[1, 4], text[1, 5] = 1.5, 0.0
    return image, text


def test_similarity_between_captions_of_one_image_does_not_change_the_loss():
    a_img, a_txt = _rotated_pair_batch(0.0)
    b_img, b_txt = _rotated_pair_batch(2.5)
    # The construction does change exactly the (0, 1) similarity.
    sim = lambda i, t: F.normalize(i, dim=-1) @ F.normalize(t, dim=-1).T  # noqa: E731
    diff = (sim(a_img, a_txt) - sim(b_img, b_txt)).abs()
    assert diff[0, 1] > 0.1
    diff[0, 1] = 0
    assert diff.max() < 1e-12

    masked = [0, 0, 1, 2]
    torch.testing.assert_close(_loss(a_img, a_txt, math.log(10.0), masked), _loss(b_img, b_txt, math.log(10.0), masked), atol=1e-6, rtol=0)
    # Without the shared image the (0, 1) entry is a negative and the loss moves.
    distinct = [0, 1, 2, 3]
    delta = _loss(a_img, a_txt, math.log(10.0), distinct) - _loss(b_img, b_txt, math.log(10.0), distinct)
    assert delta.abs() > 1e-3


def test_temperature_is_clamped_at_100():
    image, text = _features(4, 8, seed=3)
    at_cap = _loss(image, text, math.log(100.0), torch.arange(4))
    above = _loss(image, text, math.log(1000.0), torch.arange(4))
    below = _loss(image, text, math.log(50.0), torch.arange(4))
    torch.testing.assert_close(above, at_cap)
    assert abs(below.item() - at_cap.item()) > 1e-3


def test_gradients_reach_features_and_logit_scale():
    image, text = _features(4, 8, seed=4)
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = _infonce(image, text, log_scale, [0, 0, 1, 2])
    loss.backward()
    for t in (image, text):
        assert t.grad is not None and t.grad.shape == (4, 8)
        assert torch.all(t.grad.abs().sum(dim=1) > 0)
    assert log_scale.grad is not None and log_scale.grad.item() != 0
    # Above the clamp the temperature gets no gradient.
    capped = torch.tensor(math.log(1000.0), requires_grad=True)
    _infonce(image, text, capped, torch.arange(4)).backward()
    assert capped.grad.item() == 0


def test_half_precision_features_give_a_float32_loss():
    image, text = _features(4, 8, seed=6)
    loss = _loss(image.half(), text.half(), math.log(10.0), torch.arange(4))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, _loss(image, text, math.log(10.0), torch.arange(4)), atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------------
# Two gloo processes: the gathered loss must give each rank world_size x the full-batch gradient of
# its own rows (DDP's average over ranks then recovers the full-batch gradient exactly).

_SIZES = (3, 2)  # unequal local batches exercise the padding in _GatherWithGrad
_IMAGE_INDEX = [0, 1, 1, 2, 2]  # rows 1|2 and 3|4 share images; rows 2 and 3 sit on different ranks
_LOG_SCALE = math.log(12.0)


def _full_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return torch.randn(sum(_SIZES), 6, generator=g), torch.randn(sum(_SIZES), 6, generator=g)


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        image, text = _full_batch()
        start, stop = sum(_SIZES[:rank]), sum(_SIZES[: rank + 1])
        local_image = image[start:stop].clone().requires_grad_(True)
        local_text = text[start:stop].clone().requires_grad_(True)
        log_scale = torch.tensor(_LOG_SCALE, requires_grad=True)
        # What the step does: normalise locally, gather once, then the loss on the global batch.
        features = Features(
            image=gather_with_grad(F.normalize(local_image, dim=-1)),
            text=gather_with_grad(F.normalize(local_text, dim=-1)),
            logit_scale=log_scale,
        )
        batch = {"image_index": gather_rows(torch.tensor(_IMAGE_INDEX[start:stop]))}
        assert batch["image_index"].tolist() == _IMAGE_INDEX
        loss = ClipInfoNCE()(features, batch)["contrastive"]
        loss.backward()
        torch.save(
            {
                "loss": loss.detach(),
                "image_grad": local_image.grad,
                "text_grad": local_text.grad,
                "scale_grad": log_scale.grad,
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def _gloo_usable() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.slow  # ~7 s: two fresh interpreters import torch
@pytest.mark.skipif(not _gloo_usable(), reason="torch.distributed with gloo is not available")
def test_gather_with_grad_matches_full_batch_gradient_on_two_processes(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    # Loopback only (no network here); rendezvous through a file, so no port can clash.
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    world = len(_SIZES)
    mp.spawn(_gather_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)

    image, text = _full_batch()
    image.requires_grad_(True)
    text.requires_grad_(True)
    log_scale = torch.tensor(_LOG_SCALE, requires_grad=True)
    full = _infonce(image, text, log_scale, _IMAGE_INDEX)
    full.backward()

    scale_grads = []
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        start, stop = sum(_SIZES[:rank]), sum(_SIZES[: rank + 1])
        torch.testing.assert_close(got["loss"], full.detach())  # every rank computes the full loss
        torch.testing.assert_close(got["image_grad"], world * image.grad[start:stop], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["text_grad"], world * text.grad[start:stop], atol=1e-6, rtol=1e-5)
        scale_grads.append(got["scale_grad"])
    # The logit scale is replicated: DDP's average of the per-rank gradients is the full-batch one.
    torch.testing.assert_close(torch.stack(scale_grads).mean(), log_scale.grad)
