"""Checkpoints through Accelerate state, written atomically, keeping the last K; the trainer's state;
and the checks that make a resume exact.

A checkpoint is first written to `checkpoints/.tmp-step-NNNNNNNN` and only renamed to
`checkpoints/step-NNNNNNNN` once every file (trainable tensors, optimizer, scheduler, RNG states and
`trainer_state.json`) is on disk. A run killed mid-save leaves only a `.tmp-*` folder, which
`latest_checkpoint` never returns and the next run deletes. Replacing a complete checkpoint of the same
step first renames the old one to `.old-step-*`; should the process die between the two renames,
`remove_partial_checkpoints` puts it back, so a complete checkpoint of that step always survives.

Only trainable tensors are stored: the frozen base model can be reloaded from `model.name_or_path`,
so a checkpoint of a LoRA run on a 150M-parameter CLIP is a few MB, not 600.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from finetune.errors import ResumeError

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "trainer_state.json"

# Keys that may change between an interrupted run and its resume without changing what it computes.
RESUME_SAFE_KEYS = (
    "train.output_dir",
    "train.resume_from",
    "train.log_every_steps",
    "train.checkpoint_every_steps",
    "train.keep_last_checkpoints",
    "data.num_workers",
    "data.cache_preprocessed",
    "data.eval.",
    "eval.",
)


@dataclass
class TrainerState:
    """Where the loop stands; what every checkpoint stores beside the tensors."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_done_in_epoch: int = 0  # per process: each process consumes this many of its own batches
    num_processes: int = 1
    skipped_images: int = 0  # unreadable training images, summed over processes
    skipped_batches: int = 0  # batches dropped on every process because one of them had no readable image
    train_seconds: float = 0.0
    config: dict = field(default_factory=dict)  # the resolved recipe the run was started with
    negatives_in_use: str | None = None  # mining: the mined file (relative to the output folder) this epoch's batches follow
    latest_negatives: str | None = None  # mining: the newest mined file, taken up by the next epoch

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "TrainerState":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir() and (p / STATE_FILE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def read_trainer_state(checkpoint: str | os.PathLike) -> dict:
    path = Path(checkpoint) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {STATE_FILE} is missing")
    return json.loads(path.read_text())


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat if flat or not prefix else {prefix: tree}


def resume_conflicts(saved_config: dict, current_config: dict) -> list[str]:
    """`key: saved -> now` for every changed recipe key that would make the resumed run differ."""
    saved = {k.rstrip("."): v for k, v in _flatten(saved_config).items()}
    now = {k.rstrip("."): v for k, v in _flatten(current_config).items()}
    changed = []
    for key in sorted(saved.keys() | now.keys()):
        if saved.get(key, "<unset>") == now.get(key, "<unset>"):
            continue
        if any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS):
            continue
        changed.append(f"{key}: {saved.get(key, '<unset>')!r} -> {now.get(key, '<unset>')!r}")
    return changed


def with_schema_defaults(saved_config: dict) -> dict:
    """A checkpoint's config with keys added to the schema since it was written (e.g. a new `augment:`
    section) at their defaults, which keep the old behaviour: a resume is refused only for real changes.
    The config as written when it no longer validates (a moved data folder, say)."""
    import warnings

    from finetune.config.load import validate_config
    from finetune.errors import ConfigError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ignored-key notes were shown when the run started
            return validate_config(saved_config).model_dump(mode="json")
    except ConfigError:
        return saved_config


def check_resumable(state: TrainerState, checkpoint: Path, current_config: dict, num_processes: int) -> None:
    """Refuse, naming every difference, a resume that could not continue exactly where the run stopped."""
    problems = resume_conflicts(with_schema_defaults(state.config), current_config) if state.config else []
    if state.num_processes != num_processes:
        problems.append(
            f"processes: {state.num_processes} -> {num_processes} (the data order and the per-process batch count depend on it)"
        )
    if problems:
        raise ResumeError(
            f"cannot resume {checkpoint} exactly; these changed since it was written:\n  "
            + "\n  ".join(problems)
            + "\nRestore them, or start a new run in another train.output_dir. Output paths, logging, "
            "checkpoint cadence, data.num_workers and eval settings may change freely."
        )


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
                raise ResumeError(
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
    """Delete `.tmp-*` folders a killed run left behind; put back an `.old-step-*` whose replacement
    never landed. Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    for old in root.glob(".old-step-*"):
        final = root / old.name.removeprefix(".old-")
        if old.is_dir() and not final.exists():
            os.replace(old, final)
        else:
            shutil.rmtree(old, ignore_errors=True)
    removed = [p for p in root.glob(".tmp-*") if p.is_dir()]
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


def save_checkpoint(accelerator: Accelerator, root: str | os.PathLike, step: int, trainer_state: dict, keep_last: int) -> Path:
    """Write Accelerate state + trainer_state.json atomically as root/step-NNNNNNNN; prune to `keep_last`."""
    from finetune.io import atomic_write_text

    root = Path(root)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    old = root / f".old-step-{step:08d}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_text(tmp / STATE_FILE, json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)  # keep the complete one until the new one is in place
        os.replace(tmp, final)  # the commit point: before this the checkpoint does not exist
        shutil.rmtree(old, ignore_errors=True)
        for stale in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
