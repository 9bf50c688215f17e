"""The contrastive step: features as the losses see them, and gradient accumulation through Accelerate
equal to the mean of the micro-batches' gradients computed one by one."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from finetune.models.load import load_model
from finetune.models.lora import TowerLora, add_lora
from finetune.models.towers import logit_scale
from finetune.training.losses import ClipInfoNCE
from finetune.training.step import contrastive_step, gather_features, pair_tensors

CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a small star", "a ring", "a bar"]


@pytest.fixture
def adapted(tiny_clip_dir):
    torch.manual_seed(0)
    model, processor = load_model(str(tiny_clip_dir))
    settings = TowerLora(enabled=True, rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), layers=None)
    model = add_lora(model, vision=settings, text=settings, train_projections=False, train_logit_scale=True)
    with torch.no_grad():  # B starts at zero; non-zero B gives A a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    return model, processor


def make_batch(processor, rows: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tokens = processor.tokenizer([CAPTIONS[r] for r in rows], padding=True, return_tensors="pt")
    return {
        "pixel_values": torch.randn(len(rows), 3, 32, 32, generator=g),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "image_index": torch.tensor(rows),
        "source_row": torch.tensor(rows) + 100,
        "image_id": [f"id{r}" for r in rows],
        "corrupt_images": torch.tensor(0),
    }


def test_features_are_unit_float32_and_pair_tensors_ride_along(adapted):
    model, processor = adapted
    batch = make_batch(processor, [0, 1, 2], seed=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        features, pairs = gather_features(model, batch, gather=True)  # one process: nothing to gather
    assert features.image.dtype == features.text.dtype == torch.float32
    torch.testing.assert_close(features.image.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(features.text.norm(dim=-1), torch.ones(3))
    assert features.logit_scale is logit_scale(model)
    assert set(pairs) == {"image_index", "source_row"}  # not pixels, tokens, strings or scalars
    assert set(pair_tensors(batch)) == set(pairs)


def test_accumulated_gradients_equal_the_mean_of_micro_batch_gradients(adapted):
    model, processor = adapted
    micro = [make_batch(processor, [0, 1, 2], seed=1), make_batch(processor, [3, 4, 5], seed=2)]
    loss_fn = ClipInfoNCE()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}

    reference = {n: torch.zeros_like(p) for n, p in params.items()}
    for batch in micro:  # the plain path, one micro-batch at a time
        model.zero_grad()
        loss, _ = contrastive_step(model, batch, loss_fn, gather=False)
        loss.backward()
        for n, p in params.items():
            reference[n] += p.grad / len(micro)
    model.zero_grad()

    AcceleratorState._reset_state(True)
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    try:
        prepared = accelerator.prepare(model)
        synced = []
        for batch in micro:
            with accelerator.accumulate(prepared):
                loss, _ = contrastive_step(prepared, batch, loss_fn, gather=False)
                accelerator.backward(loss)
                synced.append(accelerator.sync_gradients)
        assert synced == [False, True]
        moved = 0
        for n, p in params.items():
            torch.testing.assert_close(p.grad, reference[n], atol=1e-6, rtol=1e-5, msg=n)
            moved += int(p.grad.abs().sum() > 0)
        assert moved == len(params)  # every LoRA tensor and the logit scale got gradient
    finally:
        AcceleratorState._reset_state(True)


@pytest.mark.parametrize("weight_decay", [0.0, 0.2])
def test_fused_adamw_takes_the_per_tensor_loops_steps_within_rounding(weight_decay):
    from finetune.training.step import build_adamw

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(shape, generator=g) for shape in ((64, 8), (8, 64), (32,), ())]
    params = {}
    for name, optimizer_of in {
        "toolkit": lambda ps: build_adamw(ps, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay, mixed_precision="bf16"),
        "loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=weight_decay, foreach=False),
    }.items():
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        optimizer = optimizer_of(ps)
        grads = torch.Generator().manual_seed(1)
        for _ in range(25):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=grads)
            optimizer.step()
        params[name] = ps
    fused = build_adamw([torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0, mixed_precision="no")
    assert fused.param_groups[0]["fused"]
    for a, b, s in zip(params["toolkit"], params["loop"], start):
        assert (a - s).abs().max() > 1e-2  # moved ...
        assert torch.allclose(a, b, rtol=0, atol=2e-6), (a - b).abs().max()  # ... to the loop's values, within float32 rounding


def test_fp16_keeps_the_unfused_step_that_loss_scaling_can_skip():
    from finetune.training.step import build_adamw

    optimizer = build_adamw(
        [torch.nn.Parameter(torch.zeros(2))], lr=1e-3, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.0, mixed_precision="fp16"
    )
    assert not optimizer.param_groups[0]["fused"]
