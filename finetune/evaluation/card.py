"""The model card written beside every adapter: what was adapted, on what, and what it gained."""

from __future__ import annotations

import os
from collections.abc import Mapping

import yaml

from finetune.config.schema import RecipeConfig
from finetune.evaluation.report import format_set_notes
from finetune.io import atomic_write_text


def _dataset_name(spec) -> str:
    if spec.synthetic is not None:
        return f"synthetic {spec.synthetic.domain} domain ({spec.synthetic.num_images} images, seed {spec.synthetic.seed})"
    return f"{spec.path} (split {spec.split})"


def describe_loss(cfg) -> str:
    """The recipe's loss.terms in words: `symmetric InfoNCE` for the default, else each term with its weight."""
    terms = [(t.name, t.weight) for t in cfg.loss.terms]
    if terms == [("infonce", 1.0)]:
        return "symmetric InfoNCE"
    return "the loss terms " + " + ".join(f"{w:g} x {name}" for name, w in terms) + " (README, Losses)"


def describe_negatives(batch_size: int, num_processes: int, gather_across_processes: bool) -> str:
    """What one contrastive loss sees, as a sentence: how many pairs and negatives per pair.

    Gathering only adds negatives when there is more than one process; without it each process's
    loss sees its own batch alone. "Up to" because captions of the same image are masked out of
    each other's denominators (finetune/training/losses.py), so they are never negatives.
    """
    for name, value in (("batch_size", batch_size), ("num_processes", num_processes)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    same_image = "captions of the same image are never each other's negatives"
    if num_processes == 1:
        return (
            f"Each contrastive loss sees one batch of {batch_size} pairs: up to {batch_size - 1} "
            f"in-batch negatives per pair ({same_image})."
        )
    global_batch = batch_size * num_processes
    if gather_across_processes:
        return (
            f"Features are gathered across the {num_processes} processes before the loss, so each "
            f"contrastive loss sees {global_batch} pairs: up to {global_batch - 1} in-batch negatives "
            f"per pair ({same_image})."
        )
    return (
        "Features are not gathered across processes (`loss.gather_across_processes: false`), so each "
        f"process's contrastive loss sees only its own {batch_size} pairs: up to {batch_size - 1} "
        f"in-batch negatives per pair, not {global_batch - 1} ({same_image})."
    )


def write_model_card(
    path: str | os.PathLike,
    *,
    cfg: RecipeConfig,
    results_table: str,
    trainable: dict[str, dict[str, int]],
    steps: int,
    train_seconds: float,
    num_processes: int,
    set_notes: Mapping[str, str] | None = None,
    negatives_per_pair: float | None = None,
) -> None:
    """Write the README.md model card for an adapter.

    Args:
        path: the card file (its folder must exist).
        cfg: the resolved recipe the adapter was trained with.
        results_table: the markdown table from `finetune.evaluation.report.format_results_table`.
        trainable: per-tower parameter counts from `finetune.models.lora.trainable_parameters_by_tower`.
        steps: optimizer steps run.
        train_seconds: wall time of the training loop.
        num_processes: processes that trained together.
        set_notes: optional ``{eval set: text}`` printed under the table (see report.py).
        negatives_per_pair: the mean in-batch negatives a pair really had after masking (the loss
            measures it); None when unknown (e.g. a run resumed at its last step).
    """
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
    negatives = describe_negatives(cfg.train.batch_size, num_processes, cfg.loss.gather_across_processes)
    if negatives_per_pair is not None:
        masked = "same-image and same-label" if not cfg.loss.same_label_negatives else "same-image"
        negatives += f" Measured over the steps this process trained: {negatives_per_pair:.1f} negatives per pair after {masked} masking."
    longtail = [f"sampling {cfg.sampling.kind}" + (f" (power {cfg.sampling.power:g})" if cfg.sampling.kind == "power" else "")]
    if cfg.loss.class_weights != "none":
        longtail.append(f"class weights {cfg.loss.class_weights}")
    if not cfg.loss.same_label_negatives:
        longtail.append("same-label pairs are not negatives")
    for spec in cfg.data.replay:
        longtail.append(f"replay {100 * spec.fraction:g}% of {_dataset_name(spec)}")
    notes = f"\n{format_set_notes(set_notes)}\n" if set_notes else ""
    title = base
    languages = "".join(f"- eval ({code}): {_dataset_name(spec)}\n" for code, spec in (cfg.data.eval.languages or {}).items())
    use = (
        "from transformers import CLIPModel, CLIPProcessor\n\n"
        f'model = PeftModel.from_pretrained(CLIPModel.from_pretrained("{base}"), "adapter")\n'
        'processor = CLIPProcessor.from_pretrained("adapter")'
    )
    if cfg.model.text_tower is not None:  # the adapter sits on the run's saved dual encoder, not on `base`
        swap = "distilled, then " if cfg.distill is not None else ""
        title = f"{base} + {cfg.model.text_tower} ({swap}saved in the run's base_model/)"
        use = (
            "from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor\n\n"
            'model = PeftModel.from_pretrained(VisionTextDualEncoderModel.from_pretrained("base_model"), "adapter")\n'
            'processor = VisionTextDualEncoderProcessor.from_pretrained("adapter")'
        )
    front = {"library_name": "peft", "base_model": base, "tags": ["clip", "lora", "image-text-retrieval"]}
    text = f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# LoRA adapter for `{title}`

Adapted for image-text retrieval with {describe_loss(cfg)}, LoRA on both towers.

## Data
- train: {_dataset_name(cfg.data.train)}
- eval (target): {_dataset_name(cfg.data.eval.target) if cfg.data.eval.target else "none"}
- eval (source, retention): {_dataset_name(cfg.data.eval.source) if cfg.data.eval.source else "none"}
{languages}- {"; ".join(longtail)}

## Adapters
{chr(10).join(towers)}
- projections trained: {cfg.model.train_projections}; logit scale trained: {cfg.model.train_logit_scale}

## Training
{steps} optimizer steps of {cfg.train.batch_size} pairs per process x {num_processes} process(es).
{negatives} Gradient accumulation {cfg.train.gradient_accumulation_steps} (averages gradients over
micro-batches; adds no negatives); lr {cfg.optim.lr:g} ({cfg.optim.scheduler}); mixed precision
{cfg.train.mixed_precision}; {train_seconds:.0f} s of training. The full resolved recipe is `config.yaml`.

## Retrieval
R@K is the percentage of queries whose match is in the top K (text->image: the caption's image;
image->text: any of the image's captions). Exact score ties count at their expected value under a
random order of the tied candidates.

{results_table}
{notes}
## Use
```python
from peft import PeftModel
{use}
```
"""
    atomic_write_text(path, text)
