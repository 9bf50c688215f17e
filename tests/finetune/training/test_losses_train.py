"""The loss terms inside training: gradients reach both towers' LoRA adapters through every term (a
tiny CLIP, one step); the real entry point with several terms logs each by name, trains SigLIP's
temperature and bias and the discriminator, checkpoints them, and resumes exactly; (slow) two
processes with the parameterised terms equal one process with the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from finetune import train
from finetune.config.load import validate_config
from finetune.models.load import load_model
from finetune.models.lora import TowerLora, add_lora
from finetune.models.towers import embedding_dim, model_layout
from finetune.training.checkpoint import latest_checkpoint
from finetune.training.step import contrastive_step

ROOT = Path(__file__).resolve().parents[3]
CAPTIONS = ["a red circle", "two blue squares", "a green triangle", "a small star", "a ring", "a bar"]
TERMS = ["infonce", "hn_infonce", "siglip", "vsepp", "semihard", "margin_ranking", "adversarial"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def tiny_adapted(tiny_clip_dir):
    torch.manual_seed(0)
    model, processor = load_model(str(tiny_clip_dir))
    lora = TowerLora(enabled=True, rank=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "v_proj"), layers=None)
    return add_lora(model, vision=lora, text=lora, train_projections=False, train_logit_scale=False).train(), processor


def tiny_batch(processor, n: int = 6) -> dict:
    g = torch.Generator().manual_seed(1)
    tokens = processor.tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(n)], padding=True, return_tensors="pt")
    return {
        "pixel_values": torch.randn(n, 3, 32, 32, generator=g),
        "input_ids": tokens["input_ids"],
        "attention_mask": tokens["attention_mask"],
        "image_index": torch.tensor([0, 0, 1, 2, 3, 4])[:n],  # rows 0 and 1: one image, two captions
    }


@pytest.mark.parametrize("term", TERMS)
def test_each_term_sends_gradient_to_both_towers_lora_b(tiny_clip_dir, term):
    model, processor = tiny_adapted(tiny_clip_dir)
    loss_terms = [term] if term != "adversarial" else ["infonce", {"name": "adversarial", "weight": 1.0}]
    cfg = validate_config(
        {
            "model": {"name_or_path": str(tiny_clip_dir)},
            "data": {
                "train": {"synthetic": {"domain": "target", "num_images": 8}},
                "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8}}},
            },
            "train": {"max_steps": 1},
            "loss": {"terms": loss_terms},
        }
    )
    loss_fn = train.build_loss(cfg, train_pairs=None, embed_dim=embedding_dim(model))
    if term == "adversarial":  # the adversarial term alone: only its gradient reaches the towers
        loss_fn.weights["infonce"] = 0.0
    loss, terms = contrastive_step(model, tiny_batch(processor), loss_fn, gather=False)
    assert term in terms and torch.isfinite(loss)
    loss.backward()
    layout = model_layout(model)
    norms = {"vision": 0.0, "text": 0.0}
    for name, p in model.named_parameters():
        if "lora_B" in name:
            norms[layout.tower_of(name)] += float(p.grad.abs().sum())
    assert norms["vision"] > 0 and norms["text"] > 0, norms
    for name, p in loss_fn.named_parameters():  # SigLIP's t', b and the discriminator learn too
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- the real entry point


def overrides(tiny_clip_dir, out: Path, steps: int, terms: str) -> list[str]:
    return [
        f"model.name_or_path={tiny_clip_dir}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "train.checkpoint_every_steps=2",
        "data.train.synthetic.num_images=24",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source=null",
        "data.replay=[]",
        "eval.zero_shot=false",
        "optim.warmup_steps=1",
        "train.batch_size=8",
        "eval.batch_size=64",
        "train.log_every_steps=1",
        "data.num_workers=0",
        "lora.vision.dropout=0.1",  # dropout draws RNG every step: resume must restore it
        "lora.text.dropout=0.1",
        f"loss.terms={terms}",
    ]


SIGLIP_ADVERSARIAL = "[infonce, {name: siglip, weight: 0.5}, {name: adversarial, weight: 0.1, hidden_dim: 16}]"


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_two_terms_are_logged_by_name_and_their_sum_is_the_loss(tiny_clip_dir, tmp_path):
    out = tmp_path / "two"
    assert train.main(["recipes/demo.yaml", *overrides(tiny_clip_dir, out, 3, "[infonce, {name: vsepp, weight: 2.0, margin: 0.3}]")]) == 0
    steps = [r for r in log_records(out) if "step" in r and "lr" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert {"infonce", "vsepp"} <= set(r) and r["infonce"] > 0 and r["vsepp"] > 0
    assert "contrastive" not in steps[0]
    card = (out / "README.md").read_text()
    assert "negatives per pair after same-image masking" in card  # the card still measures them
    assert "the loss terms 1 x infonce + 2 x vsepp" in card


def test_siglip_and_adversarial_parameters_train_checkpoint_and_resume_exactly(tiny_clip_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert train.main(["recipes/demo.yaml", *overrides(tiny_clip_dir, full, 4, SIGLIP_ADVERSARIAL)]) == 0
    records = [r for r in log_records(full) if "lr" in r]
    assert all({"infonce", "siglip", "adversarial", "adversarial_accuracy"} <= set(r) for r in records)
    assert all(0.0 <= r["adversarial_accuracy"] <= 1.0 for r in records)
    loss_state = load_file(latest_checkpoint(full / "checkpoints") / "trainable_1.safetensors")
    assert set(loss_state) == {
        "terms.siglip.log_temperature",
        "terms.siglip.bias",
        "terms.adversarial.discriminator.0.weight",
        "terms.adversarial.discriminator.0.bias",
        "terms.adversarial.discriminator.2.weight",
        "terms.adversarial.discriminator.2.bias",
    }
    assert loss_state["terms.siglip.bias"].item() != -10.0  # the optimizer moved them
    assert abs(loss_state["terms.siglip.log_temperature"].item() - 2.302585) > 1e-6
    AcceleratorState._reset_state(True)

    # The same run killed after step 3 (checkpoint at step 2), then resumed.
    cut = tmp_path / "cut"
    real_append = train.append_log

    class Killed(Exception):
        pass

    def log_then_die(path, record):
        real_append(path, record)
        if record.get("step") == 3:
            raise Killed

    monkeypatch.setattr(train, "append_log", log_then_die)
    with pytest.raises(Killed):
        train.main(["recipes/demo.yaml", *overrides(tiny_clip_dir, cut, 4, SIGLIP_ADVERSARIAL)])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000002"
    assert train.main(["recipes/demo.yaml", *overrides(tiny_clip_dir, cut, 4, SIGLIP_ADVERSARIAL), "train.resume_from=latest"]) == 0
    for part in ("trainable_0.safetensors", "trainable_1.safetensors"):  # the model, then the loss's parameters
        a = load_file(latest_checkpoint(full / "checkpoints") / part)
        b = load_file(latest_checkpoint(cut / "checkpoints") / part)
        assert a.keys() == b.keys() and a
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{part}:{name}")
    keys = ("infonce", "siglip", "adversarial", "adversarial_accuracy")
    full_log = [r[k] for r in log_records(full) if "lr" in r for k in keys]
    cut_log = [r[k] for r in log_records(cut) if "lr" in r for k in keys]
    assert cut_log == pytest.approx(full_log, abs=1e-5)


@pytest.mark.slow  # two fresh processes plus a one-process run
def test_two_processes_with_siglip_and_the_discriminator_equal_one_process(tiny_clip_dir, tmp_path):
    """The loss has parameters, so Accelerate wraps it in DDP: 2 CPU processes x batch 8 (features
    gathered) must train the towers, SigLIP's t' and b, and the discriminator exactly like 1 x 16."""
    common = [
        "recipes/demo.yaml",
        f"model.name_or_path={tiny_clip_dir}",
        "train.max_steps=3",
        "train.checkpoint_every_steps=null",
        "data.train.synthetic.num_images=40",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source=null",
        "data.replay=[]",
        "eval.zero_shot=false",
        "data.num_workers=0",
        f"loss.terms={SIGLIP_ADVERSARIAL}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "finetune.cli.main", "train", "--num-processes", "2", "--main-process-port", "29531"]
    proc = subprocess.run(
        [*launch, *common, "train.batch_size=8", f"train.output_dir={tmp_path / 'two'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main([*common, "train.batch_size=16", f"train.output_dir={tmp_path / 'one'}"]) == 0
    for part in ("trainable_0.safetensors", "trainable_1.safetensors"):
        two = load_file(latest_checkpoint(tmp_path / "two" / "checkpoints") / part)
        one = load_file(latest_checkpoint(tmp_path / "one" / "checkpoints") / part)
        assert two.keys() == one.keys() and one
        for name in one:
            torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=f"{part}:{name}")
    card = (tmp_path / "two" / "README.md").read_text()
    assert "negatives per pair after same-image masking" in card  # through the DDP-wrapped loss


def test_cached_step_gives_every_term_and_its_parameters_the_plain_steps_gradients(tiny_clip_dir):
    """GradCache with SigLIP, VSE++ and the discriminator: the loss's own parameters get their gradient in
    the cached step's loss pass, the towers through the re-embedded chunks; both equal the plain step's."""
    from finetune.training.step import cached_contrastive_step, plain_step

    cfg = validate_config(
        {
            "model": {"name_or_path": str(tiny_clip_dir)},
            "data": {
                "train": {"synthetic": {"domain": "target", "num_images": 8}},
                "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8}}},
            },
            "train": {"max_steps": 1},
            "loss": {"terms": ["infonce", {"name": "siglip", "weight": 0.5}, "vsepp", {"name": "adversarial", "hidden_dim": 8}]},
        }
    )
    grads = []
    for cached in (False, True):
        model, processor = tiny_adapted(tiny_clip_dir)
        with torch.no_grad():  # non-zero B, so A gets a gradient too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
        loss_fn = train.build_loss(cfg, train_pairs=None, embed_dim=embedding_dim(model))
        batch = tiny_batch(processor)
        if cached:
            loss, terms = cached_contrastive_step(model, batch, loss_fn, gather=True, micro_batch_size=4, backward=lambda l: l.backward())
        else:
            loss, terms = plain_step(model, batch, loss_fn, gather=True, backward=lambda l: l.backward())
        assert set(terms) == {"infonce", "siglip", "vsepp", "adversarial"}
        grads.append((loss, {n: p.grad.clone() for m in (model, loss_fn) for n, p in m.named_parameters() if p.requires_grad}))
    (plain_loss, plain), (cached_loss, cached) = grads
    torch.testing.assert_close(cached_loss, plain_loss, rtol=0, atol=1e-5)
    assert plain.keys() == cached.keys() and any(n.startswith("terms.siglip") for n in plain)
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=1e-4, atol=1e-5, msg=name)
