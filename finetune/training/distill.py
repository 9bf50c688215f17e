"""Stage 1 of a text-tower swap (M-CLIP style): teach the new text encoder to land where CLIP's own text
tower puts the English caption, on parallel text alone.

    student(caption in any language)  ->  teacher(the English caption)      # both (B, D), CLIP's space

The teacher is the original CLIP's text tower (frozen, `torch.no_grad`); the student is the swapped
model's text encoder plus its `text_projection`, trained fully or with LoRA (merged afterwards). The
vision tower is never touched, so image embeddings stay CLIP's bit for bit. Loss terms: MSE between
the raw (unnormalised) embeddings, as M-CLIP trains, and/or 1 - cosine; each weighted, each logged.

`text_swap_stages` is what finetune/train.py calls between the zero-shot evaluation and LoRA: the
original CLIP's English retrieval (the retention reference), stage 1, the distilled model's evaluation,
and the swapped base model written to `<output_dir>/base_model` as a standard Hugging Face folder that
stage 2's adapter sits on (`load_adapted` reads it from there).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from data_tools.multilingual import load_parallel_text
from data_tools.sampling import EpochShuffleSampler
from finetune.errors import DistillError
from finetune.io import atomic_write_text
from finetune.models.load import load_model, save_processor
from finetune.models.lora import TowerLora, add_lora
from finetune.models.towers import model_layout, text_features, unwrap
from finetune.runfolder import BASE_MODEL_DIR, EVAL
from finetune.training.step import build_adamw

REFERENCE = "original_clip"  # results name of the original CLIP scored on the `en` eval set
LOG_FILE = "distill_log.jsonl"  # stage 1's loss terms (train_log.jsonl is stage 2's, cut back on resume)


class DistillationLoss(nn.Module):
    """Named terms pulling student embeddings onto the teacher's; only terms with a weight > 0 appear."""

    def __init__(self, mse_weight: float, cosine_weight: float):
        super().__init__()
        self.mse_weight, self.cosine_weight = mse_weight, cosine_weight

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> dict[str, torch.Tensor]:
        student, teacher = student.float(), teacher.float()  # (B, D) each, unnormalised
        terms = {}
        if self.mse_weight > 0:
            terms["distill_mse"] = self.mse_weight * F.mse_loss(student, teacher)
        if self.cosine_weight > 0:
            terms["distill_cosine"] = self.cosine_weight * (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        return terms


@dataclass(frozen=True)
class DistillSettings:
    """Plain stage-1 settings (a thin copy of the recipe's distill section and optim's AdamW settings)."""

    text_training: str  # "full" | "lora"
    mse_weight: float
    cosine_weight: float
    lr: float
    batch_size: int
    max_steps: int
    warmup_steps: int
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float | None
    scheduler: str
    seed: int
    log_every_steps: int


class ParallelTextCollator:
    """[(student text, English text)] -> student tokens and teacher tokens, each padded to its longest."""

    def __init__(self, student_tokenizer, teacher_tokenizer, student_max_length: int, teacher_max_length: int):
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        self.student_max_length, self.teacher_max_length = student_max_length, teacher_max_length

    def __call__(self, rows: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
        student = self.student_tokenizer(
            [r[0] for r in rows], padding=True, truncation=True, max_length=self.student_max_length, return_tensors="pt"
        )
        teacher = self.teacher_tokenizer(
            [r[1] for r in rows], padding=True, truncation=True, max_length=self.teacher_max_length, return_tensors="pt"
        )
        return {
            "input_ids": student["input_ids"],
            "attention_mask": student["attention_mask"],  # (B, L_s)
            "teacher_input_ids": teacher["input_ids"],
            "teacher_attention_mask": teacher["attention_mask"],  # (B, L_t)
        }


class _TextTower(nn.Module):
    """The student's text path as one module, so DDP wraps exactly what trains in stage 1."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return text_features(self.model, input_ids, attention_mask)  # (B, D)


def make_student_trainable(model: nn.Module, text_training: str, text_lora: TowerLora | None) -> nn.Module:
    """Only the text side trains: the whole text encoder + projection (full) or LoRA + the projection."""
    layout = model_layout(model)
    if text_training == "full":
        for name, param in model.named_parameters():
            param.requires_grad_(layout.tower_of(name) == "text")
        return model
    off = TowerLora(enabled=False, rank=1, alpha=1.0, dropout=0.0, target_modules=("unused",), layers=None)
    model = add_lora(model, vision=off, text=text_lora, train_projections=True, train_logit_scale=False)
    for name, param in model.named_parameters():  # the visual projection's trainable copy must stay CLIP's
        if layout.tower_of(name) == "vision":
            param.requires_grad_(False)
    return model


def distill_text_tower(
    student: nn.Module,
    teacher: nn.Module,
    collator: ParallelTextCollator,
    pairs: list[tuple[str, str]],
    *,
    settings: DistillSettings,
    text_lora: TowerLora | None,
    accelerator,
    log_file: Path | None,
) -> tuple[nn.Module, dict[str, float]]:
    """Train the student's text side to reproduce the teacher's embeddings; returns (plain model, last terms).

    With text_training="lora" the adapter is merged, so the result is an ordinary dual encoder either way.
    """
    student = make_student_trainable(student, settings.text_training, text_lora)
    teacher = teacher.to(accelerator.device).eval().requires_grad_(False)
    sampler = EpochShuffleSampler(len(pairs), settings.seed)
    loader = DataLoader(pairs, batch_size=settings.batch_size, sampler=sampler, collate_fn=collator, drop_last=True)
    if len(loader) == 0:
        raise DistillError(
            f"distill.data has {len(pairs)} parallel pairs: fewer than one batch of distill.batch_size={settings.batch_size}"
        )
    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = build_adamw(
        trainable,
        lr=settings.lr,
        betas=settings.betas,
        eps=settings.eps,
        weight_decay=settings.weight_decay,
        mixed_precision=accelerator.mixed_precision,
    )
    scheduler = get_scheduler(
        settings.scheduler if settings.scheduler != "constant" else "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=settings.warmup_steps,
        num_training_steps=settings.max_steps,
    )
    tower, loader, optimizer = accelerator.prepare(_TextTower(student), loader, optimizer)
    loss_fn = DistillationLoss(settings.mse_weight, settings.cosine_weight)
    accelerator.print(
        f"Stage 1 (distillation): {len(pairs)} parallel pairs, {sum(p.numel() for p in trainable):,} trainable text parameters "
        f"({settings.text_training}), {settings.max_steps} steps"
    )

    step, epoch, terms = 0, 0, {}
    progress = tqdm(total=settings.max_steps, desc="distill", disable=not accelerator.is_local_main_process)
    tower.train()
    while step < settings.max_steps:
        sampler.epoch = epoch
        for batch in loader:
            with torch.no_grad():
                target = text_features(teacher, batch["teacher_input_ids"], batch["teacher_attention_mask"])  # (B, D)
            with accelerator.autocast():
                predicted = tower(batch["input_ids"], batch["attention_mask"])  # (B, D)
            terms = loss_fn(predicted, target)
            loss = sum(terms.values())
            if not torch.isfinite(loss):
                raise DistillError(f"distill: non-finite loss at step {step + 1}; lower distill.lr")
            accelerator.backward(loss)
            if settings.max_grad_norm is not None:
                accelerator.clip_grad_norm_(trainable, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}")
            if log_file is not None and step % settings.log_every_steps == 0 and accelerator.is_main_process:
                record = {
                    "stage": "distill",
                    "step": step,
                    "epoch": epoch,
                    "lr": scheduler.get_last_lr()[0],
                    **{k: v.item() for k, v in terms.items()},
                }
                with log_file.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if step >= settings.max_steps:
                break
        epoch += 1
    progress.close()

    student = accelerator.unwrap_model(tower).model
    # Stage 2 prepares its own model and optimizer: stage 1's must not stay registered, or its checkpoints
    # would hold (and a resume, which skips stage 1, would miss) a second model. Accelerate's call for this.
    del tower, optimizer, loader
    accelerator.free_memory()
    if settings.text_training == "lora":
        student = student.merge_and_unload()
    for param in student.parameters():
        param.requires_grad_(False)
    return student.eval(), {k: v.item() for k, v in terms.items()}


# ----------------------------------------------------------------------------- the stages train.py runs


def distill_settings(cfg) -> DistillSettings:
    d, o = cfg.distill, cfg.optim
    return DistillSettings(
        text_training=d.text_training,
        mse_weight=d.mse_weight,
        cosine_weight=d.cosine_weight,
        lr=d.lr,
        batch_size=d.batch_size,
        max_steps=d.max_steps,
        warmup_steps=d.warmup_steps,
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        max_grad_norm=o.max_grad_norm,
        scheduler=o.scheduler,
        seed=cfg.train.seed,
        log_every_steps=cfg.train.log_every_steps,
    )


def text_lora_settings(cfg) -> TowerLora:
    t = cfg.lora.text
    return TowerLora(
        enabled=True,
        rank=t.rank,
        alpha=t.alpha,
        dropout=t.dropout,
        target_modules=tuple(t.target_modules),
        layers=tuple(t.layers) if t.layers is not None else None,
    )


def save_base_model(model: nn.Module, processor, out: Path) -> Path:
    """Write `out/base_model` whole or not at all: a half-written folder is never left under that name."""
    target = out / BASE_MODEL_DIR
    tmp = out / f".tmp-{BASE_MODEL_DIR}"
    shutil.rmtree(tmp, ignore_errors=True)
    unwrap(model).save_pretrained(tmp)
    save_processor(processor, tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def text_swap_stages(cfg, model, processor, *, evaluate, eval_sets: dict, out: Path, checkpoint: Path | None, accelerator):
    """Reference score, stage 1 (when cfg.distill), its evaluation, and the saved base model.

    Returns (model for stage 2, {results name: metrics}). A resumed run reloads the base model and the
    numbers it wrote instead of distilling again, so stage 2 continues on exactly the same weights.
    """
    saved = out / EVAL / "text_swap.json"
    if checkpoint is not None and (out / BASE_MODEL_DIR).is_dir() and saved.is_file():
        model, _ = load_model(str(out / BASE_MODEL_DIR))
        accelerator.print(f"Resuming on the swapped base model in {out / BASE_MODEL_DIR}")
        return model, json.loads(saved.read_text())

    results = {}
    teacher, teacher_processor = load_model(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    teacher_limit = model_layout(teacher).text_position_limit
    if "en" in eval_sets:  # retention reference: the original CLIP text tower on the English eval set
        results[REFERENCE], _ = evaluate(
            teacher.to(accelerator.device),
            sets={"en": eval_sets["en"]},
            processor=teacher_processor,
            max_text_length=teacher_limit,
            desc="original CLIP",
        )
    if cfg.distill is not None:
        if accelerator.is_main_process:
            (out / LOG_FILE).unlink(missing_ok=True)  # a fresh stage 1 starts a fresh log
        spec = cfg.distill.data
        texts, english = load_parallel_text(
            "distill.data",
            path=spec.path,
            name=spec.name,
            revision=spec.revision,
            data_files=spec.data_files,
            split=spec.split,
            english_column=spec.english_column,
            text_columns=spec.text_columns,
            include_english=spec.include_english,
            max_samples=spec.max_samples,
            synthetic=spec.synthetic.model_dump() if spec.synthetic is not None else None,
        )
        collator = ParallelTextCollator(
            processor.tokenizer, teacher_processor.tokenizer, model_layout(model).text_position_limit, teacher_limit
        )
        model, _ = distill_text_tower(
            model,
            teacher,
            collator,
            list(zip(texts, english)),
            settings=distill_settings(cfg),
            text_lora=text_lora_settings(cfg),
            accelerator=accelerator,
            log_file=out / LOG_FILE,
        )
        results["distilled"], _ = evaluate(model, sets=eval_sets, desc="distilled")
    del teacher
    if accelerator.is_main_process:
        save_base_model(model, processor, out)
        saved.parent.mkdir(parents=True, exist_ok=True)  # eval/ exists only if the zero-shot baseline ran
        atomic_write_text(saved, json.dumps(results, indent=2))
    accelerator.wait_for_everyone()
    return model, results
