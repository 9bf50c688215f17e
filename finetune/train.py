"""Adapt a CLIP checkpoint to a domain with LoRA on both towers, and measure the gain honestly.

    accelerate launch finetune/train.py recipes/demo.yaml
    accelerate launch finetune/train.py recipes/medical.yaml train.output_dir=runs/med lora.vision.rank=8

Reads top to bottom: config -> accelerator -> model + data -> zero-shot eval -> LoRA -> loop
(accumulate, forward, loss terms, backward, clip, step, log, eval, checkpoint) -> adapter, final
eval, report, model card. Same script on one CPU, one GPU, many GPUs or many nodes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python finetune/train.py` / `accelerate launch finetune/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import warnings

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from data_tools.loading import DataLoadError, RetrievalSet, load_image_text_dataset
from finetune.card import write_model_card
from finetune.checkpoint import (
    latest_checkpoint,
    read_trainer_state,
    register_trainable_only_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from finetune.collate import ImageTextCollator
from finetune.config import ConfigError, DatasetSpec, LoraTowerConfig, RecipeConfig, load_config, save_config
from finetune.evaluate import evaluate_retrieval
from finetune.losses import ClipInfoNCE
from finetune.metrics import format_results_table, write_results
from finetune.model import (
    ModelLoadError,
    TowerLora,
    add_lora,
    extra_trainable_state,
    load_clip,
    lora_gradient_report,
    save_processor,
    trainable_parameters_by_tower,
)


# peft asks transformers for a renamed attribute on every wrap; the notice is theirs, not the user's.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, adapters receiving no gradient)."""


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch) alone, so a resumed run replays the same order.

    The loop sets `epoch` itself. There is deliberately no `set_epoch`: Accelerate calls that with its
    own pass counter, which restarts at 0 on the loader `skip_first_batches` returns, and a resumed
    run would replay epoch 0's order.
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed, self.epoch = num_rows, seed, 0

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.num_rows, generator=generator).tolist())

    def __len__(self) -> int:
        return self.num_rows


# ----------------------------------------------------------------------------- builders


def build_dataset(spec: DatasetSpec, key: str):
    fields = spec.model_dump(exclude={"synthetic"})
    synthetic = spec.synthetic.model_dump() if spec.synthetic else None
    return load_image_text_dataset(key=key, synthetic=synthetic, **fields)


def build_eval_sets(cfg: RecipeConfig) -> dict[str, RetrievalSet]:
    sets = {"target": RetrievalSet.from_pairs(build_dataset(cfg.data.eval.target, "data.eval.target"))}
    if cfg.data.eval.source is not None:
        sets["source"] = RetrievalSet.from_pairs(build_dataset(cfg.data.eval.source, "data.eval.source"))
    return sets


def tower_lora(cfg: LoraTowerConfig) -> TowerLora:
    return TowerLora(
        enabled=cfg.enabled,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=tuple(cfg.target_modules),
        layers=tuple(cfg.layers) if cfg.layers is not None else None,
    )


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if p.requires_grad and "logit_scale" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and "logit_scale" in n]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def warmup_steps(cfg, max_steps: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round((cfg.warmup_ratio or 0.0) * max_steps))


# ----------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lora.vision.rank=8")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        return run(cfg)
    except (ConfigError, ModelLoadError, DataLoadError, TrainingError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def several_processes_on_cpu() -> bool:
    """Launched as N>1 processes (torchrun / `accelerate launch --multi_gpu`) on a machine without CUDA.

    Accelerate then needs `cpu=True` to form a gloo process group; without it every process would
    silently train alone on the whole dataset.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def warn_if_cpu_processes_were_dropped(accelerator: Accelerator) -> None:
    # `accelerate launch --cpu --num_processes N` without an MPI hostfile starts ONE process.
    asked = os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and "MASTER_ADDR" in os.environ
    if asked and accelerator.num_processes == 1:
        accelerator.print(
            "warning: `accelerate launch --cpu --num_processes N` started a single process (Accelerate only "
            "spawns several CPU processes through mpirun). For N CPU processes use "
            "`accelerate launch --multi_gpu --num_processes N finetune/train.py ...` or "
            "`torchrun --nproc_per_node N finetune/train.py ...`. Continuing with 1 process."
        )


def run(cfg: RecipeConfig) -> int:
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=several_processes_on_cpu(),
    )
    warn_if_cpu_processes_were_dropped(accelerator)
    set_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    log = accelerator.print
    if cfg.train.resume_from is None and latest_checkpoint(ckpt_root) is not None:
        # Never mix two runs' checkpoints (and never let `latest` point into an older run).
        raise TrainingError(
            f"train.output_dir {out} already holds checkpoints of an earlier run: continue it with "
            "train.resume_from=latest, or pick a new train.output_dir (or delete the folder)"
        )
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        removed = remove_partial_checkpoints(ckpt_root)
        if removed:
            log(f"Removed {len(removed)} half-written checkpoint(s): {', '.join(p.name for p in removed)}")

    # -- model and data
    model, processor = load_clip(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    max_text_length = cfg.data.max_text_length or model.config.text_config.max_position_embeddings
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        train_pairs = build_dataset(cfg.data.train, "data.train")
        eval_sets = build_eval_sets(cfg)
    log(
        f"Train: {len(train_pairs)} caption-image pairs. Eval: "
        + ", ".join(f"{k} {len(v.images)} images / {len(v.captions)} captions" for k, v in eval_sets.items())
    )
    eval_kwargs = dict(
        batch_size=cfg.eval.batch_size, max_text_length=max_text_length, ks=tuple(cfg.eval.ks), accelerator=accelerator
    )

    # -- zero-shot baseline, on the same eval splits, before any adapter exists
    results: dict = {}
    zero_shot_file = out / "eval" / "zero_shot.json"
    if cfg.eval.zero_shot:
        if cfg.train.resume_from is not None and zero_shot_file.is_file():  # a resumed run keeps its baseline
            results["zero_shot"] = json.loads(zero_shot_file.read_text())
        else:
            model.to(accelerator.device)
            results["zero_shot"], _ = evaluate_retrieval(model, processor, eval_sets, desc="zero-shot", **eval_kwargs)
            if accelerator.is_main_process:
                zero_shot_file.parent.mkdir(parents=True, exist_ok=True)
                zero_shot_file.write_text(json.dumps(results["zero_shot"], indent=2))

    # -- LoRA on both towers
    model = add_lora(
        model,
        vision=tower_lora(cfg.lora.vision),
        text=tower_lora(cfg.lora.text),
        train_projections=cfg.model.train_projections,
        train_logit_scale=cfg.model.train_logit_scale,
    )
    if cfg.train.enable_gradient_checkpointing:
        base = model.base_model.model
        # Non-reentrant checkpointing lets gradients reach LoRA weights behind frozen embeddings.
        if hasattr(base, "activation_checkpointing_enable"):  # the name newer transformers releases use
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for tower, n in trainable_parameters_by_tower(model).items():
        if n["trainable"] or tower != "shared":
            log(f"Trainable {tower:>6}: {n['trainable']:,} / {n['total']:,} ({100 * n['trainable'] / n['total']:.2f}%)")

    loss_fn = ClipInfoNCE(gather_across_processes=cfg.loss.gather_across_processes)
    optimizer = build_optimizer(model, cfg.optim)
    sampler = EpochShuffleSampler(len(train_pairs), cfg.train.seed)
    train_loader = DataLoader(
        train_pairs,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=ImageTextCollator(processor, max_text_length),
        drop_last=True,  # equal batches: every step has batch_size x processes negatives
        num_workers=cfg.data.num_workers,
    )
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    if len(train_loader) == 0:
        raise TrainingError(
            f"data.train has {len(train_pairs)} pairs: fewer than one batch of train.batch_size="
            f"{cfg.train.batch_size} x {accelerator.num_processes} processes"
        )
    steps_per_epoch = math.ceil(len(train_loader) / cfg.train.gradient_accumulation_steps)
    max_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * steps_per_epoch)
    scheduler = get_scheduler(
        cfg.optim.scheduler if cfg.optim.scheduler != "constant" else "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(cfg.optim, max_steps),
        num_training_steps=max_steps,
    )
    # Not through prepare(): that would step the schedule once per process. Saved with the state.
    accelerator.register_for_checkpointing(scheduler)
    register_trainable_only_state(accelerator)

    # -- resume
    step, epoch, batches_done = 0, 0, 0
    if cfg.train.resume_from is not None:
        checkpoint = latest_checkpoint(ckpt_root) if cfg.train.resume_from == "latest" else Path(cfg.train.resume_from)
        if checkpoint is None:
            log(f"train.resume_from=latest: no complete checkpoint in {ckpt_root}, starting from step 0")
        else:
            accelerator.load_state(str(checkpoint))
            state = read_trainer_state(checkpoint)
            step, epoch, batches_done = state["step"], state["epoch"], state["batches_done_in_epoch"]
            log(f"Resumed from {checkpoint} at step {step} (epoch {epoch}, batch {batches_done})")

    def checkpoint_now() -> Path:
        state = {"step": step, "epoch": epoch, "batches_done_in_epoch": batches_done, "config": cfg.model_dump(mode="json")}
        return save_checkpoint(accelerator, ckpt_root, step, state, cfg.train.keep_last_checkpoints)

    # -- the loop
    log_file = out / "train_log.jsonl"
    corrupt_train_images = 0
    checked_gradients = False
    progress = tqdm(total=max_steps, initial=step, desc="train", disable=not accelerator.is_local_main_process)
    started = time.time()
    logit_scale = accelerator.unwrap_model(model).base_model.model.logit_scale  # the parameter itself
    model.train()
    while step < max_steps:
        sampler.epoch = epoch
        batches = accelerator.skip_first_batches(train_loader, batches_done) if batches_done else train_loader
        for batch in batches:
            batches_done += 1
            corrupt_train_images += int(batch["corrupt_images"])
            with accelerator.accumulate(model):
                outputs = model(
                    pixel_values=batch["pixel_values"],
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                )
                terms = loss_fn(outputs.image_embeds, outputs.text_embeds, logit_scale, batch["image_index"])
                loss = sum(terms.values())
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"non-finite loss at step {step + 1} (epoch {epoch}, batch {batches_done}): "
                        + ", ".join(f"{k}={v.item()}" for k, v in terms.items())
                        + f"; lr={scheduler.get_last_lr()[0]:.3g}. Lower optim.lr or use train.mixed_precision=bf16"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    if not checked_gradients:  # the silent no-op: adapters that never receive gradient
                        dead = [t for t, ok in lora_gradient_report(model).items() if not ok]
                        if dead:
                            raise TrainingError(
                                f"LoRA adapters in the {', '.join(dead)} tower(s) got no gradient after the first "
                                "step: check lora.<tower>.target_modules / layers"
                            )
                        checked_gradients = True
                    if cfg.optim.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)

            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            lr = scheduler.get_last_lr()[0]
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if step % cfg.train.log_every_steps == 0 and accelerator.is_main_process:
                record = {"step": step, "epoch": epoch, "lr": lr, **{k: v.item() for k, v in terms.items()}}
                record["logit_scale"] = float(logit_scale.exp().item())
                with log_file.open("a") as fh:
                    fh.write(json.dumps(record) + "\n")
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < max_steps:
                periodic, _ = evaluate_retrieval(
                    accelerator.unwrap_model(model), processor, {"target": eval_sets["target"]}, desc=f"step {step}", **eval_kwargs
                )
                r1 = periodic["target"]["t2i"]["R@1"]
                progress.write(f"step {step}: target t2i R@1 {r1:.2f}")
                if accelerator.is_main_process:
                    with log_file.open("a") as fh:
                        fh.write(json.dumps({"step": step, "eval": periodic}) + "\n")
            if cfg.train.checkpoint_every_steps and step % cfg.train.checkpoint_every_steps == 0:
                checkpoint_now()
            if step >= max_steps:
                break
        else:
            epoch, batches_done = epoch + 1, 0
    progress.close()
    train_seconds = time.time() - started
    checkpoint_now()

    # -- adapter, final evaluation, report
    unwrapped = accelerator.unwrap_model(model)
    results["adapted"], corrupt_eval = evaluate_retrieval(unwrapped, processor, eval_sets, desc="adapted", **eval_kwargs)
    corrupt_train_images = int(accelerator.reduce(torch.tensor(corrupt_train_images, device=accelerator.device), "sum"))
    if accelerator.is_main_process:
        adapter_dir = out / "adapter"
        unwrapped.save_pretrained(adapter_dir)
        save_processor(processor, adapter_dir)
        extra = extra_trainable_state(unwrapped)
        if extra:
            save_file({k: v.cpu() for k, v in extra.items()}, adapter_dir / "extra_trainables.safetensors")
        files = write_results(results, out / "eval")
        table = format_results_table(results)
        log("\n" + table)
        log(f"Wrote {files['json']}, {files['md']}, {files['png']}")
        if corrupt_train_images or any(corrupt_eval.values()):
            log(f"Skipped unreadable images: train {corrupt_train_images}, eval {corrupt_eval}")
        for card in (out / "README.md", adapter_dir / "README.md"):  # the adapter folder travels alone
            write_model_card(
                card,
                cfg=cfg,
                results_table=table,
                trainable=trainable_parameters_by_tower(unwrapped),
                steps=step,
                train_seconds=train_seconds,
                num_processes=accelerator.num_processes,
            )
        log(f"Adapter: {adapter_dir}  (load with peft.PeftModel.from_pretrained(CLIPModel.from_pretrained(base), adapter))")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
