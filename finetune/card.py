"""The model card written beside every adapter: what was adapted, on what, and what it gained."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from finetune.config import RecipeConfig


def _dataset_name(spec) -> str:
    if spec.synthetic is not None:
        return f"synthetic {spec.synthetic.domain} domain ({spec.synthetic.num_images} images, seed {spec.synthetic.seed})"
    return f"{spec.path} (split {spec.split})"


def write_model_card(
    path: str | os.PathLike,
    *,
    cfg: RecipeConfig,
    results_table: str,
    trainable: dict[str, dict[str, int]],
    steps: int,
    train_seconds: float,
    num_processes: int,
) -> None:
    base = cfg.model.name_or_path
    towers = []
    for tower in ("vision", "text"):
        t = getattr(cfg.lora, tower)
        if t.enabled:
            layers = "all layers" if t.layers is None else f"layers {t.layers}"
            towers.append(
                f"- **{tower}**: rank {t.rank}, alpha {t.alpha:g}, dropout {t.dropout:g}, "
                f"modules {', '.join(t.target_modules)}, {layers}; "
                f"{trainable[tower]['trainable']:,} trainable parameters"
            )
        else:
            towers.append(f"- **{tower}**: frozen")
    front = {"library_name": "peft", "base_model": base, "tags": ["clip", "lora", "image-text-retrieval"]}
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# LoRA adapter for `{base}`

Adapted for image-text retrieval with symmetric InfoNCE, LoRA on both towers.

## Data
- train: {_dataset_name(cfg.data.train)}
- eval (target): {_dataset_name(cfg.data.eval.target)}
- eval (source, retention): {_dataset_name(cfg.data.eval.source) if cfg.data.eval.source else "none"}

## Adapters
{chr(10).join(towers)}
- projections trained: {cfg.model.train_projections}; logit scale trained: {cfg.model.train_logit_scale}

## Training
{steps} optimizer steps of {cfg.train.batch_size} pairs per process x {num_processes} process(es), so
{cfg.train.batch_size * num_processes - 1} in-batch negatives per pair; gradient accumulation
{cfg.train.gradient_accumulation_steps}; lr {cfg.optim.lr:g} ({cfg.optim.scheduler}); mixed precision
{cfg.train.mixed_precision}; {train_seconds:.0f} s of training. The full resolved recipe is `config.yaml`.

## Retrieval, zero-shot vs adapted
R@K is the percentage of queries whose match is in the top K (text->image: the caption's image;
image->text: any of the image's captions).

{results_table}

## Use
```python
from peft import PeftModel
from transformers import CLIPModel, CLIPProcessor

model = PeftModel.from_pretrained(CLIPModel.from_pretrained("{base}"), "adapter")
processor = CLIPProcessor.from_pretrained("adapter")
```
"""
    path = Path(path)
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
