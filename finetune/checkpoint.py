"""Checkpoints through Accelerate state, written atomically, keeping the last K.

A checkpoint is first written to `checkpoints/.tmp-step-NNNNNNNN` and only renamed to
`checkpoints/step-NNNNNNNN` once every file (model, optimizer, scheduler, RNG states and
`trainer_state.json`) is on disk. A run killed mid-save leaves only a `.tmp-*` folder, which
`latest_checkpoint` never returns and the next run deletes.

Only trainable tensors are stored: the frozen base model can be reloaded from `model.name_or_path`,
so a checkpoint of a LoRA run on a 150M-parameter CLIP is a few MB, not 600.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := STEP_DIR.match(p.name)) and p.is_dir() and (p / STATE_FILE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(path.read_text())


def register_trainable_only_state(accelerator: Accelerator) -> None:
    """Make `save_state` / `load_state` store only parameters that require grad."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for i, model in enumerate(models):
                state = {
                    name: param.detach().cpu().contiguous()
                    for name, param in accelerator.unwrap_model(model).named_parameters()
                    if param.requires_grad
                }
                save_file(state, os.path.join(output_dir, f"trainable_{i}.safetensors"))
        weights.clear()  # nothing else for Accelerate to write for the models

    def load_hook(models, input_dir):
        for i, model in enumerate(models):
            state = load_file(os.path.join(input_dir, f"trainable_{i}.safetensors"))
            target = accelerator.unwrap_model(model)
            expected = {n for n, p in target.named_parameters() if p.requires_grad}
            if set(state) != expected:
                missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
                raise ValueError(
                    f"checkpoint {input_dir} does not match this run's trainable parameters "
                    f"(missing {missing[:3]}..., unexpected {extra[:3]}...): was the recipe's lora section changed?"
                )
            with torch.no_grad():
                params = dict(target.named_parameters())
                for name, tensor in state.items():
                    params[name].copy_(tensor)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def remove_partial_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Delete `.tmp-*` folders a killed run left behind; returns what was removed."""
    root = Path(root)
    removed = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def save_checkpoint(
    accelerator: Accelerator, root: str | os.PathLike, step: int, trainer_state: dict, keep_last: int
) -> Path:
    """Write Accelerate state + trainer_state.json atomically as root/step-NNNNNNNN; prune to `keep_last`."""
    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state_tmp = tmp / (STATE_FILE + ".part")
        state_tmp.write_text(json.dumps(trainer_state, indent=2))
        os.replace(state_tmp, tmp / STATE_FILE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)  # the commit point: before this the checkpoint does not exist
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
