"""A trained run's adapter on disk: saved (LoRA weights, processor, extra trained tensors) and loaded back
onto its base for every later command."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from finetune.errors import ModelLoadError
from finetune.models.load import load_model, save_processor
from finetune.models.towers import architecture_for, model_layout, unwrap
from finetune.runfolder import ADAPTER, ADAPTER_CONFIG, BASE_MODEL_DIR, CONFIG

EXTRA_TRAINABLES_FILE = "extra_trainables.safetensors"


def extra_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trained tensors PEFT's adapter file does not hold (the logit scale)."""
    name = model_layout(model).logit_scale
    scale = getattr(unwrap(model), name)
    return {name: scale.detach().clone()} if scale.requires_grad else {}


def save_adapter(model: nn.Module, processor, adapter_dir: str | os.PathLike) -> Path:
    """The adapter folder `load_adapted` reads: PEFT adapter, processor, and any extra trained tensors."""
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    model.save_pretrained(adapter_dir)
    save_processor(processor, adapter_dir)
    extra = extra_trainable_state(model)
    if extra:
        save_file({k: v.cpu() for k, v in extra.items()}, adapter_dir / EXTRA_TRAINABLES_FILE)
    return adapter_dir


def load_adapted(run_dir: str | os.PathLike, *, adapter_subdir: str = ADAPTER):
    """(adapted model in eval mode, processor) of a finished run, for every command after training.

    The base checkpoint, revision and remote-code switch come from the run's resolved `config.yaml`;
    the adapter, processor and any extra trained tensors from `run_dir/adapter`.
    """
    from finetune.config.load import load_resolved_config

    run_dir = Path(run_dir)
    cfg = load_resolved_config(run_dir / CONFIG)
    adapter = run_dir / adapter_subdir
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise ModelLoadError(f"{adapter} holds no adapter_config.json: is {run_dir} a finished run folder?")
    if cfg.model.text_tower is not None:  # a swapped text tower: the run saved its (distilled) base model
        base, _ = load_model(str(run_dir / BASE_MODEL_DIR), None, cfg.model.trust_remote_code)
    else:  # always the full-precision base, also for a QLoRA run: merges and exports never go into quantized weights
        base, _ = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    if cfg.model.quantization != "none":
        print(f"{run_dir}: adapter trained on a {cfg.model.quantization} base; loaded onto the full-precision base")
    processor = architecture_for(base.config).processor_class.from_pretrained(adapter)
    model = PeftModel.from_pretrained(base, adapter)
    extra = adapter / EXTRA_TRAINABLES_FILE
    if extra.is_file():
        with torch.no_grad():
            for name, tensor in load_file(extra).items():
                getattr(unwrap(model), name).copy_(tensor)
    return model.eval(), processor
