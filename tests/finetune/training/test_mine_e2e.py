"""The real entry point (finetune/train.py main) with mining on: refreshed files, what the checkpoints record,
and a resumed run that ends exactly where an uninterrupted one does."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from finetune import train
from finetune.training.checkpoint import latest_checkpoint, read_trainer_state
from tests.test_train_e2e import (
    DROPOUT,
    SimulatedKill,
    demo_overrides,
    trainable_tensors,
)

MINING = ["mining.enabled=true", "mining.relative_margin=0", "mining.negatives_per_anchor_in_batch=2"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def killed_after_step_9(tiny_clip_dir, out, args: list[str], monkeypatch) -> None:
    """A 10-step run of `args` into `out` that dies right after step 9 is logged (the last checkpoint: 8)."""
    real_append = train.append_log

    def log_then_die(path, record):
        real_append(path, record)
        if record.get("step") == 9:
            raise SimulatedKill(9)

    monkeypatch.setattr(train, "append_log", log_then_die)
    with pytest.raises(SimulatedKill):
        train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=10), *args])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)


def test_mining_refreshes_and_the_sampler_switches_at_the_next_epoch(tiny_clip_dir, tmp_path, capsys):
    # 48 target pairs + 16 replay rows = 8 batches of 8 an epoch: epoch 1 starts after step 8.
    out = tmp_path / "mined"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=10), *MINING, "mining.refresh_every_steps=2"]) == 0
    mined = sorted(p.name for p in (out / "mining").glob("*.parquet"))
    assert mined == [f"negatives-step{s:08d}.parquet" for s in (0, 2, 4, 6, 8)]  # none at the last step: nothing would use it
    for step in (0, 2, 4, 6, 8):
        path = out / "mining" / f"negatives-step{step:08d}.parquet"
        summary = json.loads(path.with_suffix(".json").read_text())
        assert summary["step"] == step and summary["num_pairs"] == 48  # data.train only, replay rows are never anchors
        assert summary["rows"] == pq.read_metadata(path).num_rows
        assert sum(summary["counts"][d]["kept"] for d in ("t2i", "i2t")) == summary["rows"]
        table = pq.read_table(path).to_pydict()
        assert all(0 <= r < 48 for r in table["anchor_row"] + table["negative_row"])
    assert json.loads((out / "mining" / "negatives-step00000000.json").read_text())["rows"] > 0
    state = read_trainer_state(latest_checkpoint(out / "checkpoints"))
    assert (state["step"], state["epoch"]) == (10, 1)
    assert state["latest_negatives"] == state["negatives_in_use"] == "mining/negatives-step00000008.parquet"
    middle = read_trainer_state(out / "checkpoints" / "step-00000008")  # after step 8's refresh, still in epoch 0
    assert middle["negatives_in_use"] == "mining/negatives-step00000000.parquet"
    assert middle["latest_negatives"] == "mining/negatives-step00000008.parquet"
    printed = capsys.readouterr().out
    assert "| guard: same_image |" in printed and "Mining step 8:" in printed


def test_resume_with_mining_matches_the_uninterrupted_run(tiny_clip_dir, tmp_path, monkeypatch):
    # No replay: 48 pairs / 8 = 6 batches an epoch. Refresh at 4 and 8: epoch 1 (steps 7-12) follows step 4's
    # file; the kill after step 9 resumes from checkpoint 8, mid-epoch 1, which must keep step 4's file.
    args = [*DROPOUT, "data.replay=[]", *MINING, "mining.refresh_every_steps=4"]
    full = tmp_path / "full"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, full, steps=10), *args]) == 0
    AcceleratorState._reset_state(True)

    cut = tmp_path / "cut"
    killed_after_step_9(tiny_clip_dir, cut, args, monkeypatch)
    saved = read_trainer_state(latest_checkpoint(cut / "checkpoints"))
    assert (saved["step"], saved["epoch"]) == (8, 1)
    assert saved["negatives_in_use"] == "mining/negatives-step00000004.parquet"
    assert saved["latest_negatives"] == "mining/negatives-step00000008.parquet"
    step8 = (cut / "mining" / "negatives-step00000008.parquet").read_bytes()

    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, cut, steps=10), *args, "train.resume_from=latest"]) == 0
    assert (cut / "mining" / "negatives-step00000008.parquet").read_bytes() == step8  # reused, not mined again
    for name in ("negatives-step00000000.parquet", "negatives-step00000004.parquet", "negatives-step00000008.parquet"):
        assert (cut / "mining" / name).read_bytes() == (full / "mining" / name).read_bytes(), name
    assert pq.read_metadata(cut / "mining" / "negatives-step00000004.parquet").num_rows > 0  # the sampler had work to do
    a, b = trainable_tensors(full), trainable_tensors(cut)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    full_log = [json.loads(l) for l in (full / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    cut_log = [json.loads(l) for l in (cut / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    assert [r["step"] for r in cut_log] == list(range(1, 11))
    assert [r["infonce"] for r in cut_log] == pytest.approx([r["infonce"] for r in full_log], abs=1e-5)


def test_mined_batches_change_what_the_loss_sees(tiny_clip_dir, tmp_path, monkeypatch):
    """With mining on, the batches of epoch 0 hold each anchor's mined negatives: the loss sees other rows."""
    seen = {}

    def record(label):
        real = train.plain_step

        def step(model, batch, loss_fn, **kw):
            seen.setdefault(label, []).append(sorted(batch["source_row"].tolist()))
            return real(model, batch, loss_fn, **kw)

        return step

    for label, extra in (("plain", []), ("mined", MINING)):
        monkeypatch.setattr(train, "plain_step", record(label))
        assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / label, steps=3), "data.replay=[]", *extra]) == 0
        AcceleratorState._reset_state(True)
    assert seen["plain"] != seen["mined"]


@pytest.mark.slow
def test_two_processes_with_mining_equal_one_process_with_the_global_batch(tiny_clip_dir, tmp_path):
    """Each process embeds its shard, the main one mines; the sampler composes global batches of 2 x 8, which
    Accelerate deals out: the same batches, the same loss, the same weights as 1 process x 16."""
    import os
    import subprocess
    import sys

    from tests.test_train_e2e import ROOT

    common = [
        "recipes/demo.yaml",
        f"model.name_or_path={tiny_clip_dir}",
        "train.max_steps=4",
        "train.checkpoint_every_steps=null",
        "data.train.synthetic.num_images=40",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source.synthetic.num_images=8",
        "data.replay=[]",
        "eval.zero_shot=false",
        "data.num_workers=0",
        *MINING,
        "mining.refresh_every_steps=2",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "finetune.cli.main", "train", "--num-processes", "2", "--main-process-port", "29519"]
    proc = subprocess.run(
        [*launch, *common, "train.batch_size=8", f"train.output_dir={tmp_path / 'two'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main([*common, "train.batch_size=16", f"train.output_dir={tmp_path / 'one'}"]) == 0
    for name in ("negatives-step00000000.parquet", "negatives-step00000002.parquet"):
        two = pq.read_table(tmp_path / "two" / "mining" / name).to_pydict()
        one = pq.read_table(tmp_path / "one" / "mining" / name).to_pydict()
        assert two["negative_row"] == one["negative_row"] and two["anchor_row"] == one["anchor_row"], name
    a, b = trainable_tensors(tmp_path / "two"), trainable_tensors(tmp_path / "one")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_mining_augmentation_and_loss_terms_together_resume_exactly(tiny_clip_dir, tmp_path, monkeypatch):
    """Mined batches under the augmentation's (epoch, position) keys, with a learned-parameter term beside
    InfoNCE: the mined file reaches the sampler through the augmentation wrapper, and a run killed after
    step 9 and resumed ends where the uninterrupted run does (LoRA, SigLIP's temperature and bias, log)."""
    args = [
        *DROPOUT,
        "data.replay=[]",
        *MINING,
        "mining.refresh_every_steps=4",
        "augment.image.random_resized_crop.enabled=true",
        "augment.image.rotation.enabled=true",
        "augment.text.word_dropout=0.2",
        "loss.terms=[infonce, {name: siglip, weight: 0.5}]",
    ]
    full = tmp_path / "full"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, full, steps=10), *args]) == 0
    AcceleratorState._reset_state(True)
    cut = tmp_path / "cut"
    killed_after_step_9(tiny_clip_dir, cut, args, monkeypatch)
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, cut, steps=10), *args, "train.resume_from=latest"]) == 0

    assert read_trainer_state(latest_checkpoint(cut / "checkpoints"))["negatives_in_use"] == "mining/negatives-step00000004.parquet"
    for kind in ("trainable_0", "trainable_1"):  # the model's LoRA, then the loss's parameters
        a = load_file(latest_checkpoint(full / "checkpoints") / f"{kind}.safetensors")
        b = load_file(latest_checkpoint(cut / "checkpoints") / f"{kind}.safetensors")
        assert a.keys() == b.keys() and len(a) > 0, kind
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=f"{kind}:{name}")
    full_log = [json.loads(l) for l in (full / "train_log.jsonl").read_text().splitlines() if "siglip" in l]
    cut_log = [json.loads(l) for l in (cut / "train_log.jsonl").read_text().splitlines() if "siglip" in l]
    assert [r["step"] for r in cut_log] == list(range(1, 11))
    for key in ("infonce", "siglip"):
        assert [r[key] for r in cut_log] == pytest.approx([r[key] for r in full_log], abs=1e-5)
