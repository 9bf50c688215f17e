"""A finished run folder without training: tiny CLIP, LoRA on both towers with random non-zero B
(so the adapter really changes the model), optional trained projections and logit scale. Shared by the
export and retrieval tests."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune.config.load import save_config, validate_config
from finetune.models.adapter import save_adapter
from finetune.models.load import load_model
from finetune.models.lora import add_lora
from finetune.models.towers import logit_scale

DEMO_BASE = Path(__file__).resolve().parents[2] / "recipes" / "assets" / "demo-clip"


def make_run(
    run_dir: Path,
    base_dir: Path,
    *,
    train_projections: bool = False,
    train_logit_scale: bool = False,
    eval_images: int = 24,
    export: dict | None = None,
    target_domain: str = "target",
    lora_scale: float = 0.3,
) -> Path:
    cfg = validate_config(
        {
            "model": {"name_or_path": str(base_dir), "train_projections": train_projections, "train_logit_scale": train_logit_scale},
            "data": {
                "train": {"synthetic": {"domain": "target", "num_images": 8}},
                "eval": {
                    "target": {"synthetic": {"domain": target_domain, "num_images": eval_images, "seed": 1}},
                    "source": {"synthetic": {"domain": "source", "num_images": eval_images, "seed": 1}},
                },
            },
            "train": {"max_steps": 1, "output_dir": str(run_dir)},
            "export": export or {},
        }
    )
    model, processor = load_model(str(base_dir))
    from finetune.train import tower_lora

    torch.manual_seed(0)  # lora_A's init: the same run folder every time
    peft_model = add_lora(model, tower_lora(cfg.lora.vision), tower_lora(cfg.lora.text), train_projections, train_logit_scale)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=g) * lora_scale)
            elif param.requires_grad and "modules_to_save" in name:
                param.add_(torch.randn(param.shape, generator=g) * lora_scale)
        if train_logit_scale:
            logit_scale(peft_model).add_(0.7)
    save_adapter(peft_model, processor, run_dir / "adapter")  # what a training run writes
    save_config(cfg, run_dir / "config.yaml")
    return run_dir
