"""Tests for finetune.training.checkpoint: finding complete checkpoints, cleaning partial ones, and a real
single-process Accelerate save/load that stores only trainable tensors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from safetensors.torch import load_file
from torch import nn

from finetune.errors import ResumeError
from finetune.training.checkpoint import (
    STATE_FILE,
    TrainerState,
    check_resumable,
    latest_checkpoint,
    list_checkpoints,
    read_trainer_state,
    register_trainable_only_state,
    remove_partial_checkpoints,
    save_checkpoint,
)


def _complete(root: Path, name: str, step: int = 0) -> Path:
    path = root / name
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    return path


# --------------------------------------------------------------------------------------------------
# Listing and cleaning


def test_list_checkpoints_skips_partial_folders_and_sorts_numerically(tmp_path):
    _complete(tmp_path, "step-00000010", 10)
    _complete(tmp_path, "step-00000009", 9)
    _complete(tmp_path, "step-00000100", 100)
    _complete(tmp_path, ".tmp-step-00000200", 200)  # complete files, but never renamed: not a checkpoint
    (tmp_path / "step-00000300").mkdir()  # half-written: no trainer_state.json
    (tmp_path / "step-00000300" / "optimizer.bin").write_bytes(b"x")
    (tmp_path / "step-00000400").write_text("a file, not a folder")
    _complete(tmp_path, "step-abc")
    _complete(tmp_path, "other")

    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000009", "step-00000010", "step-00000100"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000100"


def test_numeric_order_does_not_depend_on_zero_padding(tmp_path):
    _complete(tmp_path, "step-9")
    _complete(tmp_path, "step-10")
    _complete(tmp_path, "step-2")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-2", "step-9", "step-10"]
    assert latest_checkpoint(tmp_path).name == "step-10"


def test_missing_or_empty_root_has_no_checkpoints(tmp_path):
    assert list_checkpoints(tmp_path / "nope") == []
    assert latest_checkpoint(tmp_path / "nope") is None
    _complete(tmp_path, ".tmp-step-00000001")
    (tmp_path / "step-00000002").mkdir()
    assert latest_checkpoint(tmp_path) is None


def test_remove_partial_checkpoints_deletes_only_tmp_folders(tmp_path):
    tmp_a = _complete(tmp_path, ".tmp-step-00000004")
    tmp_b = tmp_path / ".tmp-step-00000006"
    tmp_b.mkdir()
    (tmp_b / "nested").mkdir()
    keep = _complete(tmp_path, "step-00000002")
    half = tmp_path / "step-00000008"
    half.mkdir()
    stray_file = tmp_path / ".tmp-notes"
    stray_file.write_text("not a folder")

    removed = remove_partial_checkpoints(tmp_path)

    assert sorted(p.name for p in removed) == [tmp_a.name, tmp_b.name]
    assert not tmp_a.exists() and not tmp_b.exists()
    assert keep.is_dir() and (keep / STATE_FILE).is_file()
    assert half.is_dir()
    assert stray_file.is_file()
    assert remove_partial_checkpoints(tmp_path / "missing") == []


def test_read_trainer_state(tmp_path):
    ckpt = _complete(tmp_path, "step-00000005", 5)
    assert read_trainer_state(ckpt) == {"step": 5}
    incomplete = tmp_path / "step-00000006"
    incomplete.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a complete checkpoint: trainer_state\.json is missing"):
        read_trainer_state(incomplete)


# --------------------------------------------------------------------------------------------------
# A real (single-process, CPU) Accelerator


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(True)
    acc = Accelerator(cpu=True)
    yield acc
    AcceleratorState._reset_state(True)


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)  # the "frozen base"
    return model


def _prepared(accelerator):
    model = _tiny_model()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    register_trainable_only_state(accelerator)
    return model, optimizer


def _train_step(model, optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    loss = model(torch.randn(8, 4, generator=g)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_save_checkpoint_writes_only_trainable_tensors_and_state(accelerator, tmp_path):
    model, optimizer = _prepared(accelerator)
    _train_step(model, optimizer, seed=1)
    root = tmp_path / "checkpoints"

    path = save_checkpoint(accelerator, root, 7, {"step": 7, "epoch": 0}, keep_last=3)

    assert path == root / "step-00000007"
    assert read_trainer_state(path) == {"step": 7, "epoch": 0}
    assert not (path / (STATE_FILE + ".part")).exists()
    assert not list(root.glob(".tmp-*"))
    tensors = load_file(str(path / "trainable_0.safetensors"))
    assert set(tensors) == {"2.weight", "2.bias"}  # the frozen layer 0 is not stored
    torch.testing.assert_close(tensors["2.weight"], model[2].weight.detach(), atol=0, rtol=0)
    # Accelerate wrote no full model weights of its own.
    assert not list(path.glob("model*.safetensors")) and not list(path.glob("pytorch_model*"))
    assert (path / "optimizer.bin").is_file()


def test_save_checkpoint_keeps_last_k_and_replaces_a_stale_tmp(accelerator, tmp_path):
    model, optimizer = _prepared(accelerator)
    root = tmp_path / "checkpoints"
    # A killed run left a .tmp for step 3 with junk in it; the new save must not inherit it.
    stale = root / ".tmp-step-00000003"
    stale.mkdir(parents=True)
    (stale / "junk.txt").write_text("old")

    for step in (1, 2, 3, 4):
        _train_step(model, optimizer, seed=step)
        save_checkpoint(accelerator, root, step, {"step": step}, keep_last=2)

    assert [p.name for p in list_checkpoints(root)] == ["step-00000003", "step-00000004"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000003", "step-00000004"]
    assert not (root / "step-00000003" / "junk.txt").exists()
    assert read_trainer_state(latest_checkpoint(root)) == {"step": 4}


def test_load_state_restores_trainable_params_and_optimizer(accelerator, tmp_path):
    model, optimizer = _prepared(accelerator)
    _train_step(model, optimizer, seed=1)
    path = save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep_last=1)
    saved = _snapshot(model)
    saved_opt = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}

    _train_step(model, optimizer, seed=2)
    _train_step(model, optimizer, seed=3)
    with torch.no_grad():
        model[0].weight.add_(1.0)  # a frozen tensor changed behind our back: not in the checkpoint
    assert not torch.equal(model[2].weight, saved["2.weight"])

    accelerator.load_state(str(path))

    for name in ("2.weight", "2.bias"):
        torch.testing.assert_close(model.get_parameter(name).detach(), saved[name], atol=0, rtol=0)
    # Frozen weights are not part of the checkpoint, so load_state leaves them as they are.
    torch.testing.assert_close(model[0].weight.detach(), saved["0.weight"] + 1.0, atol=0, rtol=0)
    state = optimizer.state_dict()["state"][0]
    torch.testing.assert_close(state["exp_avg"], saved_opt["exp_avg"], atol=0, rtol=0)
    torch.testing.assert_close(state["step"], saved_opt["step"], atol=0, rtol=0)


def test_load_state_with_different_trainable_parameters_names_the_lora_section(accelerator, tmp_path):
    model, optimizer = _prepared(accelerator)
    _train_step(model, optimizer, seed=1)
    path = save_checkpoint(accelerator, tmp_path, 1, {"step": 1}, keep_last=1)

    # This run trains a different set of tensors (as when lora.* targets change between runs).
    model[0].weight.requires_grad_(True)
    model[2].bias.requires_grad_(False)
    with pytest.raises(ResumeError, match=r"does not match this run's trainable parameters.*lora section") as info:
        accelerator.load_state(str(path))
    assert "0.weight" in str(info.value) and "2.bias" in str(info.value)


# --------------------------------------------------------------------------------------------------
# Replacing a checkpoint of the same step never leaves a moment without a complete one


def test_saving_a_step_twice_keeps_one_complete_checkpoint_with_the_new_contents(accelerator, tmp_path):
    model, optimizer = _prepared(accelerator)
    save_checkpoint(accelerator, tmp_path, 4, {"step": 4, "version": 1}, keep_last=2)
    save_checkpoint(accelerator, tmp_path, 4, {"step": 4, "version": 2}, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]
    assert read_trainer_state(tmp_path / "step-00000004")["version"] == 2


def test_a_crash_between_the_two_renames_keeps_the_old_checkpoint(accelerator, tmp_path, monkeypatch):
    import os

    model, optimizer = _prepared(accelerator)
    save_checkpoint(accelerator, tmp_path, 4, {"step": 4, "version": 1}, keep_last=2)
    real_replace = os.replace
    calls = []

    def die_on_commit(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".tmp-step"):  # the new checkpoint's rename: the process dies here
            raise KeyboardInterrupt
        return real_replace(src, dst)

    monkeypatch.setattr("finetune.training.checkpoint.os.replace", die_on_commit)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, 4, {"step": 4, "version": 2}, keep_last=2)
    monkeypatch.setattr("finetune.training.checkpoint.os.replace", real_replace)
    # The old complete checkpoint was moved aside, not deleted, before the new one was committed...
    assert ("step-00000004", ".old-step-00000004") in calls
    assert latest_checkpoint(tmp_path) is None
    # ...and the next run's clean-up puts it back before anything looks for checkpoints.
    remove_partial_checkpoints(tmp_path)
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000004"
    assert read_trainer_state(tmp_path / "step-00000004")["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004"]


# --------------------------------------------------------------------------------------------------
# Resume checks


def _config(**train) -> dict:
    return {
        "model": {"name_or_path": "base"},
        "data": {"train": {"path": "d"}, "eval": {"target": {"path": "e"}}, "num_workers": 0},
        "optim": {"lr": 1e-4},
        "train": {"batch_size": 8, "seed": 0, "output_dir": "runs/a", "log_every_steps": 10, **train},
        "eval": {"every_steps": None},
    }


def test_resume_refuses_changes_that_break_exactness_and_names_each(tmp_path):
    state = TrainerState(step=8, num_processes=2, config=_config())
    now = _config(batch_size=4, seed=1)
    now["optim"]["lr"] = 2e-4
    now["data"]["train"]["path"] = "other"
    with pytest.raises(ResumeError) as info:
        check_resumable(state, tmp_path / "step-00000008", now, num_processes=1)
    message = str(info.value)
    for line in (
        "train.batch_size: 8 -> 4",
        "train.seed: 0 -> 1",
        "optim.lr: 0.0001 -> 0.0002",
        "data.train.path: 'd' -> 'other'",
        "processes: 2 -> 1",
    ):
        assert line in message, line
    assert "train.output_dir:" not in message


def test_resume_allows_output_logging_eval_and_worker_changes(tmp_path):
    state = TrainerState(step=8, num_processes=1, config=_config())
    now = _config(output_dir="runs/b", log_every_steps=1, resume_from="latest", checkpoint_every_steps=5)
    now["eval"]["every_steps"] = 100
    now["data"]["num_workers"] = 4
    now["data"]["eval"]["target"]["path"] = "another eval set"
    check_resumable(state, tmp_path, now, num_processes=1)  # no error


def test_trainer_state_round_trips_through_json_and_ignores_unknown_keys():
    state = TrainerState(step=3, epoch=1, batches_done_in_epoch=2, num_processes=2, skipped_images=5, skipped_batches=1)
    data = state.to_json()
    assert TrainerState.from_json({**data, "something_newer": 1}) == state
    assert data["skipped_images"] == 5
