"""GradCache: the cached step gives the plain full-batch step's loss and LoRA gradients (fp32, 1e-5),
with LoRA dropout on, under gradient accumulation, and its RNG bookkeeping is what makes that true."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

from finetune.models.load import load_model
from finetune.models.lora import TowerLora, add_lora
from finetune.training.losses import ClipInfoNCE
from finetune.training.step import cached_contrastive_step, contrastive_step, plain_step

CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a small star", "a ring", "a bar", "a dot"]


def adapted_model(tiny_clip_dir, dropout: float):
    torch.manual_seed(0)
    model, processor = load_model(str(tiny_clip_dir))
    settings = TowerLora(enabled=True, rank=4, alpha=8.0, dropout=dropout, target_modules=("q_proj", "v_proj", "mlp.fc1"), layers=None)
    model = add_lora(model, vision=settings, text=settings, train_projections=False, train_logit_scale=True)
    with torch.no_grad():  # B starts at zero; non-zero B gives A a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model.train(), processor


def make_batch(processor, n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    rows = [i % len(CAPTIONS) for i in range(n)]
    tokens = processor.tokenizer([CAPTIONS[r] for r in rows], padding=True, return_tensors="pt")
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "image_index": torch.arange(n),
        "source_row": torch.arange(n),
        "corrupt_images": torch.tensor(0),
    }


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return grads


def backward(loss):
    loss.backward()


def test_cached_step_equals_the_plain_full_batch_step_without_dropout(tiny_clip_dir):
    model, processor = adapted_model(tiny_clip_dir, dropout=0.0)
    batch, loss_fn = make_batch(processor, 10, seed=1), ClipInfoNCE()
    plain_loss, _ = plain_step(model, batch, loss_fn, gather=True, backward=backward)
    plain = gradients(model)
    cached_loss, terms = cached_contrastive_step(model, batch, loss_fn, gather=True, micro_batch_size=3, backward=backward)
    cached = gradients(model)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-5)
    assert set(terms) == {"contrastive"} and not cached_loss.requires_grad
    assert plain.keys() == cached.keys() and any("logit_scale" in n for n in plain)
    assert sum("lora_" in n for n in plain) > 0
    for name in plain:
        assert plain[name].abs().max() > 0, name
        torch.testing.assert_close(cached[name], plain[name], rtol=0, atol=1e-5, msg=name)


def reference_with_dropout(model, batch, loss_fn, micro: int, seed: int):
    """The plain full-batch loss with the dropout masks the cached step draws: the chunks embedded one
    after another with autograd from the same RNG state, all in one graph, one backward."""
    torch.manual_seed(seed)
    images, texts = [], []
    from finetune.training.step import _chunks, _embed

    for chunk in _chunks(batch, micro):
        image, text = _embed(model, chunk)
        images.append(image)
        texts.append(text)
    from finetune.models.towers import logit_scale
    from finetune.training.losses import Features

    terms = loss_fn(Features(torch.cat(images), torch.cat(texts), logit_scale(model)), {"image_index": batch["image_index"]})
    loss = sum(terms.values())
    loss.backward()
    return loss.detach(), gradients(model)


def test_cached_step_with_dropout_restores_each_chunks_rng(tiny_clip_dir):
    model, processor = adapted_model(tiny_clip_dir, dropout=0.3)
    batch, loss_fn = make_batch(processor, 10, seed=2), ClipInfoNCE()
    ref_loss, ref = reference_with_dropout(model, batch, loss_fn, micro=4, seed=7)
    after_reference = torch.get_rng_state()

    torch.manual_seed(7)
    loss, _ = cached_contrastive_step(model, batch, loss_fn, gather=True, micro_batch_size=4, backward=backward)
    cached = gradients(model)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-5)
    for name in ref:
        torch.testing.assert_close(cached[name], ref[name], rtol=0, atol=1e-5, msg=name)
    assert torch.equal(torch.get_rng_state(), after_reference)  # RNG moves on as if each chunk ran once

    # the masks matter: the same re-run without restoring RNG gives other gradients
    torch.manual_seed(7)
    import finetune.training.step as step_module

    original = step_module._set_rng_state
    step_module._set_rng_state = lambda state, device: None
    try:
        cached_contrastive_step(model, batch, loss_fn, gather=True, micro_batch_size=4, backward=backward)
    finally:
        step_module._set_rng_state = original
    unrestored = gradients(model)
    assert max((unrestored[n] - ref[n]).abs().max() for n in ref if "lora_A" in n) > 1e-4


def test_cached_step_under_accelerate_accumulation_equals_plain(tiny_clip_dir):
    """Two accumulated micro-batches through Accelerate: cached == plain, gradients averaged."""
    model, processor = adapted_model(tiny_clip_dir, dropout=0.0)
    batches = [make_batch(processor, 8, seed=3), make_batch(processor, 8, seed=4)]
    loss_fn = ClipInfoNCE()
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        prepared = accelerator.prepare(model)
        results = {}
        for kind in ("plain", "cached"):
            for batch in batches:
                with accelerator.accumulate(prepared):
                    if kind == "plain":
                        plain_step(prepared, batch, loss_fn, gather=True, backward=accelerator.backward)
                    else:
                        cached_contrastive_step(prepared, batch, loss_fn, gather=True, micro_batch_size=3, backward=accelerator.backward)
            results[kind] = gradients(prepared)
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
    manual = {}
    for batch in batches:
        loss, _ = contrastive_step(model, batch, loss_fn, gather=True)
        (loss / 2).backward()
    manual = gradients(model)
    for name in manual:
        torch.testing.assert_close(results["plain"][name], manual[name], rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(results["cached"][name], manual[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cached_step_under_autocast_stays_close_to_plain(tiny_clip_dir, dtype):
    model, processor = adapted_model(tiny_clip_dir, dropout=0.0)
    batch, loss_fn = make_batch(processor, 8, seed=5), ClipInfoNCE()
    with torch.autocast("cpu", dtype=dtype):
        plain_loss, _ = plain_step(model, batch, loss_fn, gather=True, backward=backward)
    plain = gradients(model)
    with torch.autocast("cpu", dtype=dtype):
        cached_loss, _ = cached_contrastive_step(model, batch, loss_fn, gather=True, micro_batch_size=3, backward=backward)
    cached = gradients(model)
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=2e-2)
    for name in plain:
        scale = plain[name].abs().max().item()
        assert (cached[name] - plain[name]).abs().max().item() <= 0.1 * scale + 1e-6, name
