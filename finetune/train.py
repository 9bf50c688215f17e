"""Adapt a CLIP checkpoint to a domain with LoRA on both towers, and measure the gain honestly.

    accelerate launch finetune/train.py recipes/demo.yaml
    accelerate launch finetune/train.py recipes/medical.yaml train.output_dir=runs/med lora.vision.rank=8

`run()` reads top to bottom: config -> accelerator -> model + data -> zero-shot eval -> LoRA -> loss,
loader, optimizer -> resume -> the loop (accumulate, forward, loss terms, backward, clip, step, log,
eval, checkpoint) -> final eval, adapter, report, model card. Same script on one CPU, one GPU, many
GPUs or many nodes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from functools import partial
from pathlib import Path

from finetune.quiet import quiet_third_party_notices
from finetune.threads import set_cpu_threads
from finetune.timing import available_cores

quiet_third_party_notices()  # before peft imports bitsandbytes

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from transformers import get_scheduler  # noqa: E402

from data_tools.collate import (  # noqa: E402
    ImageTextCollator,
    count_truncated_captions,
    format_truncation_warning,
)
from data_tools.loading import RetrievalSet, load_image_text_dataset  # noqa: E402
from data_tools.pipeline import (  # noqa: E402
    cache_preprocessed_images,
    default_num_workers,
    processor_target_size,
)
from finetune.config.load import load_config, save_config  # noqa: E402
from finetune.config.schema import LoraTowerConfig, RecipeConfig
from finetune.config.specs import (  # noqa: E402
    dataset_arguments,
    dataset_specs,
    eval_set_name,
    resolve_max_text_length,
)
from finetune.errors import (  # noqa: E402
    ConfigError,
    DomainClipError,
    ResumeError,
    TrainingError,
    TrainingInterrupted,
)
from finetune.evaluation.card import write_model_card  # noqa: E402
from finetune.evaluation.evaluate import baseline_results, evaluate_retrieval  # noqa: E402
from finetune.evaluation.metrics import duplicate_caption_texts  # noqa: E402
from finetune.evaluation.prompts import FILE as CLASS_PROMPTS_FILE  # noqa: E402
from finetune.evaluation.prompts import class_captions, prompts_for_sets, save_class_prompts  # noqa: E402
from finetune.evaluation.report import (
    describe_duplicate_captions,
    format_language_table,
    format_results_table,
    write_results,
)
from finetune.io import atomic_write_text  # noqa: E402
from finetune.models.adapter import save_adapter
from finetune.models.attention import apply_attention
from finetune.models.load import load_model, load_model_config, set_image_size
from finetune.models.lora import (
    TowerLora,
    add_lora,
    lora_gradient_report,
    trainable_parameters_by_tower,
)
from finetune.models.qlora import (  # noqa: E402
    bnb_quantization_config,
    full_precision_modules,
    prepare_quantized_for_training,
)
from finetune.models.text_swap import build_text_tower_swap
from finetune.models.towers import embedding_dim, logit_scale  # noqa: E402
from finetune.runfolder import ADAPTER, BASELINES, CHECKPOINTS, CONFIG, EVAL, TRAIN_LOG, ZERO_SHOT
from finetune.training.checkpoint import (
    TrainerState,
    check_resumable,
    latest_checkpoint,
    read_trainer_state,
    register_trainable_only_state,
    remove_partial_checkpoints,
    save_checkpoint,
)
from finetune.training.data import (
    TrainingSet,
    augmented_loader_parts,
    build_augmentation,
    build_class_weights,
    build_sampler,
    build_training_set,
    training_dataset,
)
from finetune.training.distill import REFERENCE, text_swap_stages
from finetune.training.losses import (
    ClipInfoNCE,
    CompositeLoss,
    HardnessWeightedInfoNCE,
    MarginRanking,
    MaxViolationTriplet,
    ModalityAdversarial,
    SemiHardTriplet,
    SigLIPLoss,
)
from finetune.training.mining import Miner, build_mined_sampler  # noqa: E402
from finetune.training.step import build_adamw, cached_contrastive_step, plain_step  # noqa: E402

# ----------------------------------------------------------------------------- entry point


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/demo.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. lora.vision.rank=8")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(load_config(args.recipe, args.overrides))
    except TrainingInterrupted as exc:  # Ctrl-C in the loop: where it stopped and how to go on, no traceback
        resume = " ".join(["domainclip train", args.recipe, *args.overrides, "train.resume_from=latest"])
        print(f"\n{exc}. Resume with: {resume}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("\ninterrupted before the first training step: nothing to resume", file=sys.stderr)
        return 130
    except DomainClipError as exc:  # the toolkit's own errors: one clear line; anything else keeps its traceback
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


def run(cfg: RecipeConfig) -> int:
    accelerator = build_accelerator(cfg)
    max_text_length = resolve_max_text_length(cfg)  # config.json only: recipe errors before any work
    out = Path(cfg.train.output_dir)
    checkpoint = prepare_output_dir(cfg, out, accelerator)
    model, processor = build_base_model(cfg, accelerator, max_text_length)
    set_image_size(processor, cfg.data.image_size)
    train_pairs, eval_sets = build_datasets(cfg, processor.tokenizer, max_text_length, accelerator)
    prompts = build_class_prompts(cfg, train_pairs, eval_sets, out, accelerator)
    evaluate = partial(
        evaluate_retrieval,
        processor=processor,
        batch_size=cfg.eval.batch_size,
        max_text_length=max_text_length,
        ks=tuple(cfg.eval.ks),
        num_workers=loader_workers(cfg, accelerator),
        accelerator=accelerator,
        class_prompts=prompts,
        class_counts=train_pairs.class_counts(),
    )
    results = {"zero_shot": zero_shot_results(model, evaluate, eval_sets, out, checkpoint, accelerator)} if cfg.eval.zero_shot else {}
    results.update(classification_baselines(cfg, model, processor, train_pairs, eval_sets, out, checkpoint, accelerator, max_text_length))
    if cfg.model.text_tower is not None:  # swapped text tower: original CLIP's English score, stage 1, saved base
        model, swap_results = text_swap_stages(
            cfg, model, processor, evaluate=evaluate, eval_sets=eval_sets, out=out, checkpoint=checkpoint, accelerator=accelerator
        )
        results.update(swap_results)

    model = build_model(cfg, model, accelerator)
    loss_fn = build_loss(cfg, train_pairs, embed_dim=embedding_dim(model))
    train_loader, sampler = build_train_loader(cfg, train_pairs, processor, max_text_length, accelerator)
    model, train_loader, loss_fn = prepare(accelerator, model, train_loader, loss_fn)
    step = build_step(cfg, accelerator)
    max_steps = count_max_steps(cfg, train_loader, len(train_pairs), accelerator)
    optimizer, scheduler = build_optimizer_and_scheduler(cfg, model, loss_fn, max_steps, accelerator)
    state = resume(accelerator, checkpoint, cfg, out)
    miner = build_miner(cfg, processor, train_pairs, max_text_length, accelerator, out)
    if miner is not None:
        miner.start(accelerator.unwrap_model(model), state)  # step 0's negatives (a resumed run has its files)

    try:
        state = train_loop(
            cfg,
            accelerator,
            model,
            step,
            loss_fn,
            optimizer,
            scheduler,
            train_loader,
            sampler,
            state,
            max_steps,
            evaluate=partial(evaluate, sets=dict([next(iter(eval_sets.items()))])),
            out=out,  # target (or the first language)
            miner=miner,
        )
    except KeyboardInterrupt:  # the state object holds the step reached; the last complete checkpoint is on disk
        raise TrainingInterrupted(state.step, latest_checkpoint(out / CHECKPOINTS)) from None

    results["adapted"], skipped_eval = evaluate(accelerator.unwrap_model(model), sets=eval_sets, desc="adapted")
    write_artifacts(
        cfg,
        accelerator,
        accelerator.unwrap_model(model),
        processor,
        results,
        state,
        skipped_eval,
        eval_sets,
        out,
        negatives_per_pair=getattr(accelerator.unwrap_model(loss_fn), "negatives_per_pair", lambda: None)(),
        class_prompts=prompts,
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


# ----------------------------------------------------------------------------- the loop


def train_loop(
    cfg, accelerator, model, step, loss_fn, optimizer, scheduler, loader, sampler, state, max_steps, *, evaluate, out, miner=None
):
    log_file = out / TRAIN_LOG
    progress = tqdm(total=max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process)
    last_saved = state.step if state.step else -1  # a resumed run starts on a saved checkpoint
    pending_skipped = 0  # unreadable images seen by this process since the last checkpoint
    checked_gradients = False
    started = time.time() - state.train_seconds
    model.train()
    while state.step < max_steps:
        sampler.epoch = state.epoch
        if miner is not None:  # the mined file this epoch's batches are composed around
            miner.start_epoch(state, sampler)
        if hasattr(loader.dataset, "epoch"):  # label-only rows draw their template per epoch
            loader.dataset.epoch = state.epoch
        skip = state.batches_done_in_epoch
        usable = 0
        for batch in accelerator.skip_first_batches(loader, skip) if skip else loader:
            state.batches_done_in_epoch += 1
            pending_skipped += int(batch["corrupt_images"])
            if not contrastive_batch_on_every_process(batch, accelerator, cfg.loss.gather_across_processes):
                # All ranks skip it together, so no rank waits in a collective the others never enter.
                state.skipped_batches += 1
                continue
            usable += 1
            with accelerator.accumulate(model):
                loss, terms = step(model, batch, loss_fn)  # forward, loss terms, backward
                check_finite(loss, terms, state, scheduler)
                if accelerator.sync_gradients:
                    if not checked_gradients:
                        check_adapters_get_gradient(model)
                        checked_gradients = True
                    if cfg.optim.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(all_trainable(model, loss_fn), cfg.optim.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            state.train_seconds = time.time() - started
            lr = scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            if state.step % cfg.train.log_every_steps == 0 and accelerator.is_main_process:
                scale = float(logit_scale(model).exp().item())
                extras = getattr(accelerator.unwrap_model(loss_fn), "log_values", dict)()  # e.g. the discriminator's accuracy
                append_log(
                    log_file,
                    {
                        "step": state.step,
                        "epoch": state.epoch,
                        "lr": lr,
                        **{k: v.item() for k, v in terms.items()},
                        "logit_scale": scale,
                        **extras,
                    },
                )
            if cfg.eval.every_steps and state.step % cfg.eval.every_steps == 0 and state.step < max_steps:
                periodic, _ = evaluate(accelerator.unwrap_model(model), desc=f"step {state.step}")
                if accelerator.is_main_process:
                    name, metrics = next(iter(periodic.items()))
                    progress.write(f"step {state.step}: {name} t2i R@1 {metrics['t2i']['R@1']:.2f}")
                    append_log(log_file, {"step": state.step, "eval": periodic})
            if miner is not None:  # a refresh is written before this step's checkpoint, which records it
                miner.after_step(accelerator.unwrap_model(model), state, max_steps)
            if cfg.train.checkpoint_every_steps and state.step % cfg.train.checkpoint_every_steps == 0:
                pending_skipped = checkpoint(accelerator, cfg, out, state, pending_skipped)
                last_saved = state.step
            if state.step >= max_steps:
                break
        else:
            if usable == 0 and skip == 0:
                raise TrainingError(
                    f"data.train: a whole pass over the data had no batch with two readable images on every process "
                    f"({state.skipped_batches} batches skipped): check the image column and files"
                )
            state.epoch, state.batches_done_in_epoch = state.epoch + 1, 0
    progress.close()
    if last_saved != state.step:  # the periodic checkpoint may already be the final one
        pending_skipped = checkpoint(accelerator, cfg, out, state, pending_skipped)
    return state


# ----------------------------------------------------------------------------- builders


def build_accelerator(cfg: RecipeConfig) -> Accelerator:
    threads_line = share_cpu_threads()
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps,
        cpu=several_processes_on_cpu(),
    )
    if threads_line:
        accelerator.print(threads_line)
    warn_if_cpu_processes_were_dropped(accelerator)
    set_seed(cfg.train.seed)
    return accelerator


def build_base_model(cfg: RecipeConfig, accelerator: Accelerator, max_text_length: int):
    """The checkpoint the recipe names (quantized for QLoRA when asked), or CLIP with its text tower
    swapped for model.text_tower; each tower's attention kernel set by model.attn_implementation."""
    if cfg.model.text_tower is None:
        model, processor = load_base_model(cfg, accelerator)
    elif cfg.model.quantization != "none":
        raise ConfigError("recipe", ["model.quantization: not supported together with model.text_tower (the swapped tower trains in full)"])
    else:
        set_seed(cfg.train.seed)  # the new text projection's initialisation
        model, processor = build_text_tower_swap(
            cfg.model.name_or_path, cfg.model.text_tower, cfg.model.revision, cfg.model.trust_remote_code
        )
    attention, tokens = apply_attention(
        model,
        cfg.model.attn_implementation,
        on_cpu=accelerator.device.type == "cpu",
        mixed_precision=accelerator.mixed_precision,
        image_size=cfg.data.image_size,
        max_text_length=max_text_length,
    )
    if attention != {tower: "sdpa" for tower in tokens}:
        accelerator.print(
            "Attention: "
            + ", ".join(f"{t} {attention[t]} ({tokens[t]} tokens)" for t in tokens)
            + f" (model.attn_implementation={cfg.model.attn_implementation})"
        )
    return model, processor


def prepare_output_dir(cfg: RecipeConfig, out: Path, accelerator: Accelerator) -> Path | None:
    """Write the resolved config; find (and vet) the checkpoint to resume from, if any."""
    root = out / CHECKPOINTS
    if accelerator.is_main_process:
        removed = remove_partial_checkpoints(root)
        if removed:
            accelerator.print(f"Removed {len(removed)} half-written checkpoint(s): {', '.join(p.name for p in removed)}")
    accelerator.wait_for_everyone()
    if cfg.train.resume_from is None:
        if latest_checkpoint(root) is not None:  # never mix two runs' checkpoints
            raise TrainingError(
                f"train.output_dir {out} already holds checkpoints of an earlier run: continue it with "
                "train.resume_from=latest, or pick a new train.output_dir (or delete the folder)"
            )
        checkpoint = None
    elif cfg.train.resume_from == "latest":
        checkpoint = latest_checkpoint(root)
        if checkpoint is None:
            accelerator.print(f"train.resume_from=latest: no complete checkpoint in {root}, starting from step 0")
    else:
        checkpoint = Path(cfg.train.resume_from)
    if checkpoint is not None:
        try:
            saved = TrainerState.from_json(read_trainer_state(checkpoint))
        except FileNotFoundError as exc:
            raise ResumeError(f"train.resume_from: {exc}") from None
        check_resumable(saved, checkpoint, cfg.model_dump(mode="json"), accelerator.num_processes)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / CONFIG)
    return checkpoint


def build_datasets(cfg: RecipeConfig, tokenizer, max_text_length: int, accelerator: Accelerator):
    specs = dataset_specs(cfg)
    with accelerator.main_process_first():  # the main process fills the datasets cache first
        loaded = {
            key: load_image_text_dataset(
                # Replay rows are unlabelled: class-aware options are about data.train's classes.
                key=key,
                **{**dataset_arguments(spec, cfg.train.seed), **({"label_column": None} if key.startswith("data.replay") else {})},
            )
            for key, spec in specs.items()
        }
    for key, pairs in loaded.items():
        count, example = count_truncated_captions(tokenizer, pairs["caption"], max_text_length)
        if count:
            accelerator.print(format_truncation_warning(key, count, len(pairs), example, max_text_length, tokenizer.model_max_length))
    replay = [loaded.pop(f"data.replay.{i}") for i in range(len(cfg.data.replay))]
    train_pairs = build_training_set(cfg, loaded.pop("data.train"), replay)
    eval_sets = {eval_set_name(key): RetrievalSet.from_pairs(pairs) for key, pairs in loaded.items()}
    replayed = "".join(
        f" + replay {i}: {size} pairs, {100 * f:g}% of each epoch" for i, (_, size, f) in enumerate(train_pairs.replay_parts)
    )
    accelerator.print(
        f"Train: {train_pairs.num_primary} caption-image pairs{replayed}. Eval: "
        + ", ".join(f"{k} {v.num_images} images / {len(v.captions)} captions" for k, v in eval_sets.items())
    )
    for name, note in eval_set_notes(eval_sets).items():
        accelerator.print(f"Eval set {name}: {note}")
    return train_pairs, eval_sets


def build_class_prompts(cfg: RecipeConfig, train_pairs, eval_sets: dict[str, RetrievalSet], out: Path, accelerator) -> dict:
    """{labelled eval set: ClassPrompts}: the recipe's templates, else the class's own captions (training's
    first); said once, and saved to eval/class_prompts.json for export and the card."""
    primary = train_pairs.pairs.select(range(train_pairs.num_primary))
    choices = primary["caption_choices"] if "caption_choices" in primary.column_names else None
    train_captions = class_captions(train_pairs.labels, primary["caption"], choices)
    prompts = prompts_for_sets(cfg, eval_sets, train_captions)
    for name, p in prompts.items():
        accelerator.print(f"Eval set {name}: {p.describe()}")
        if p.warning:
            accelerator.print(f"warning: {p.warning}")
    if accelerator.is_main_process and prompts:
        (out / EVAL).mkdir(parents=True, exist_ok=True)
        save_class_prompts(prompts, out / EVAL / CLASS_PROMPTS_FILE)
    return prompts


def instance_recall_misleads(eval_sets: dict[str, RetrievalSet]) -> list[str]:
    """Labelled sets where most captions repeat another's text (label-only sets): lead with class-level numbers."""
    return [
        name
        for name, rset in eval_sets.items()
        if rset.labels is not None and duplicate_caption_texts(rset.captions)["duplicate_captions"] > len(rset.captions) / 2
    ]


def eval_set_notes(eval_sets: dict[str, RetrievalSet], class_prompts: dict | None = None) -> dict[str, str]:
    """Per eval set, what a reader of its numbers should know: duplicate caption texts tie exactly, and
    which texts its classes were classified against."""
    notes = {name: describe_duplicate_captions(duplicate_caption_texts(rset.captions)) for name, rset in eval_sets.items()}
    for name, prompts in (class_prompts or {}).items():
        notes[name] += f" Classification: {prompts.describe(max_classes=20)}." + (
            f" Warning: {prompts.warning}." if prompts.warning else ""
        )
    for name in instance_recall_misleads(eval_sets):
        notes[name] += (
            " Most captions repeat another's text (one per class, as in a label-only set), so instance recall "
            "misleads here: read the class-level rows (classification, class_retrieval, long_tail) first."
        )
    return notes


def zero_shot_results(model, evaluate, eval_sets, out: Path, checkpoint: Path | None, accelerator) -> dict:
    """The unadapted model on the same splits; a resumed run keeps the baseline it measured."""
    path = out / EVAL / ZERO_SHOT
    if checkpoint is not None and path.is_file():
        return json.loads(path.read_text())
    model.to(accelerator.device)
    results, _ = evaluate(model, sets=eval_sets, desc="zero-shot")
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(results, indent=2))
    return results


def classification_baselines(cfg, model, processor, train_pairs, eval_sets, out: Path, checkpoint, accelerator, max_text_length) -> dict:
    """Linear probe and k-NN on the base model's frozen image features (eval.baselines), fitted on data.train's
    labelled images; {} without labels. A resumed run keeps the numbers it measured (eval/baselines.json)."""
    if not cfg.eval.baselines or train_pairs.labels is None or not any(r.labels is not None for r in eval_sets.values()):
        return {}
    path = out / EVAL / BASELINES
    if checkpoint is not None and path.is_file():
        return json.loads(path.read_text())["results"]
    model.to(accelerator.device)
    train_set = RetrievalSet.from_pairs(train_pairs.pairs.select(range(train_pairs.num_primary)))
    results, chosen = baseline_results(
        model,
        processor,
        train_set,
        eval_sets,
        kinds=tuple(cfg.eval.baselines),
        batch_size=cfg.eval.batch_size,
        max_text_length=max_text_length,
        num_workers=loader_workers(cfg, accelerator),
        accelerator=accelerator,
        seed=cfg.train.seed,
    )
    for kind, choice in chosen.items():
        scores = ", ".join(f"{name} top1 {r['classification']['top1']:.2f}" for name, r in results[kind].items())
        accelerator.print(f"Baseline {kind} ({_describe_choice(choice)}): {scores}")
    if accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"results": results, "chosen": chosen}, indent=2, default=str))
    return results


def _describe_choice(chosen: dict) -> str:
    knob = "C" if "C" in chosen else "k"
    return f"{knob}={chosen[knob]:g}, selected on {chosen.get('selected_on', 'holdout')}"


def load_base_model(cfg: RecipeConfig, accelerator: Accelerator):
    """The checkpoint as the recipe says: full precision, or quantized through bitsandbytes (QLoRA)."""
    m = cfg.model
    quantization = bnb_quantization_config(
        m.quantization,
        m.quant_type,
        m.double_quant,
        m.compute_dtype,
        keep_full_precision=full_precision_modules(load_model_config(m.name_or_path, m.revision, m.trust_remote_code)),
    )
    model, processor = load_model(
        m.name_or_path, m.revision, m.trust_remote_code, quantization_config=quantization, device=accelerator.device
    )
    if quantization is not None:
        accelerator.print(f"Base loaded in {m.quantization} through bitsandbytes (QLoRA); LoRA trains in full precision")
        model = prepare_quantized_for_training(model)
    return model, processor


def tower_lora(cfg: LoraTowerConfig) -> TowerLora:
    return TowerLora(
        enabled=cfg.enabled,
        rank=cfg.rank,
        alpha=cfg.alpha,
        dropout=cfg.dropout,
        target_modules=tuple(cfg.target_modules),
        layers=tuple(cfg.layers) if cfg.layers is not None else None,
    )


def build_model(cfg: RecipeConfig, model, accelerator: Accelerator):
    """LoRA on both towers (each with its own settings), optional gradient checkpointing."""
    set_seed(cfg.train.seed)  # adapter init must not depend on what ran before (zero-shot eval draws RNG)
    model = add_lora(
        model,
        vision=tower_lora(cfg.lora.vision),
        text=tower_lora(cfg.lora.text),
        train_projections=cfg.model.train_projections,
        train_logit_scale=cfg.model.train_logit_scale,
    )
    if cfg.train.enable_gradient_checkpointing:
        base = model.get_base_model()
        # Non-reentrant checkpointing lets gradients reach LoRA weights behind frozen embeddings.
        if hasattr(base, "activation_checkpointing_enable"):  # the name newer transformers releases use
            base.activation_checkpointing_enable({"use_reentrant": False})
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for tower, n in trainable_parameters_by_tower(model).items():
        if n["trainable"] or tower != "shared":
            accelerator.print(f"Trainable {tower:>6}: {n['trainable']:,} / {n['total']:,} ({100 * n['trainable'] / n['total']:.2f}%)")
    return model


def build_loss(cfg: RecipeConfig, train_pairs: TrainingSet, *, embed_dim: int) -> torch.nn.Module:
    """The recipe's loss.terms as one module returning {term name: weight x value} (finetune/training/losses.py)."""
    same_label = cfg.loss.same_label_negatives
    class_weights = build_class_weights(cfg, train_pairs)
    max_logit_scale = 100.0  # CLIP's clamp on exp(logit_scale)
    builders = {
        "infonce": lambda t: ClipInfoNCE(max_logit_scale, same_label_negatives=same_label, class_weights=class_weights),
        "hn_infonce": lambda t: HardnessWeightedInfoNCE(
            t.beta, max_logit_scale=max_logit_scale, same_label_negatives=same_label, class_weights=class_weights
        ),
        "siglip": lambda t: SigLIPLoss(t.temperature_init, t.bias_init, same_label_negatives=same_label),
        "vsepp": lambda t: MaxViolationTriplet(t.margin, same_label_negatives=same_label),
        "semihard": lambda t: SemiHardTriplet(t.margin, same_label_negatives=same_label),
        "margin_ranking": lambda t: MarginRanking(t.margin, same_label_negatives=same_label),
        "adversarial": lambda t: ModalityAdversarial(embed_dim, t.hidden_dim, t.reversal, seed=cfg.train.seed),
    }
    terms = {t.name: (builders[t.name](t), t.weight) for t in cfg.loss.terms}
    return CompositeLoss(terms, same_label_negatives=same_label)


def build_step(cfg: RecipeConfig, accelerator: Accelerator):
    """The contrastive step: the whole batch at once, or GradCache's cached step when
    train.micro_batch_size is set (the same gradients, the activation memory of a micro-batch)."""
    gather = cfg.loss.gather_across_processes
    if cfg.train.micro_batch_size is None or cfg.train.micro_batch_size >= cfg.train.batch_size:
        return partial(plain_step, gather=gather, backward=accelerator.backward)
    return partial(
        cached_contrastive_step,
        gather=gather,
        micro_batch_size=cfg.train.micro_batch_size,
        backward=accelerator.backward,
    )


def build_miner(cfg: RecipeConfig, processor, train_pairs: TrainingSet, max_text_length: int, accelerator: Accelerator, out: Path):
    """Hard-negative mining hooks for the loop (finetune/training/mining.py), or None when mining is off."""
    if not cfg.mining.enabled:
        return None
    return Miner(cfg, processor, train_pairs, max_text_length, loader_workers(cfg, accelerator), accelerator, out, log=accelerator.print)


def loader_workers(cfg: RecipeConfig, accelerator: Accelerator) -> int:
    if cfg.data.num_workers != "auto":
        return cfg.data.num_workers
    return default_num_workers(available_cores(), int(os.environ.get("LOCAL_WORLD_SIZE", "1")))  # cores are per machine


def build_train_loader(cfg: RecipeConfig, train_pairs: TrainingSet, processor, max_text_length: int, accelerator: Accelerator):
    if cfg.data.cache_preprocessed:
        with accelerator.main_process_first():  # one process resizes; the others read its datasets cache
            train_pairs = dataclasses.replace(train_pairs, pairs=cache_preprocessed_images(train_pairs.pairs, processor.image_processor))
    sampler = build_mined_sampler(cfg, build_sampler(cfg, train_pairs), accelerator.num_processes)
    workers = loader_workers(cfg, accelerator)
    draft = processor_target_size(processor.image_processor) if cfg.data.decode_draft else None
    dataset = training_dataset(cfg, train_pairs)
    image_augment, text_augment = build_augmentation(cfg)
    if image_augment or text_augment:  # samples keyed by (epoch, position): same pixels for any num_workers or resume
        dataset, sampler = augmented_loader_parts(dataset, sampler, cfg.train.seed, text_augment)
    loader = DataLoader(
        dataset,
        batch_size=cfg.train.batch_size,
        sampler=sampler,
        collate_fn=ImageTextCollator(processor, max_text_length, draft_size=draft, augment=image_augment, augment_seed=cfg.train.seed),
        drop_last=True,  # equal batches: every step has batch_size x processes negatives
        num_workers=workers,
        # Workers kept across epochs skip start-up costs, but keep their copy of the dataset: not for
        # label-only rows, which draw their caption template per epoch.
        persistent_workers=workers > 0 and not hasattr(dataset, "epoch"),
        pin_memory=accelerator.device.type == "cuda",
        # Each new iterator draws a seed for its workers; from its own generator, not the global RNG, so a
        # resumed run (which starts an iterator mid-epoch) sees the same dropout masks as an uninterrupted one.
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    return loader, sampler


def prepare(accelerator: Accelerator, model, loader, loss_fn):
    """Accelerate wraps the model and shards the loader; a loss with parameters is a model too (DDP, checkpoints)."""
    if any(p.requires_grad for p in loss_fn.parameters()):
        model, loader, loss_fn = accelerator.prepare(model, loader, loss_fn)
    else:
        model, loader = accelerator.prepare(model, loader)
        loss_fn = loss_fn.to(accelerator.device)
    register_trainable_only_state(accelerator)
    return model, loader, loss_fn


def count_max_steps(cfg: RecipeConfig, loader, num_pairs: int, accelerator: Accelerator) -> int:
    if len(loader) == 0:
        raise TrainingError(
            f"data.train has {num_pairs} pairs: fewer than one batch of train.batch_size="
            f"{cfg.train.batch_size} x {accelerator.num_processes} processes"
        )
    steps_per_epoch = math.ceil(len(loader) / cfg.train.gradient_accumulation_steps)
    if cfg.train.max_steps is not None:  # 0 after distillation: stage 1 alone, the adapter stays a no-op
        return cfg.train.max_steps
    return math.ceil(cfg.train.epochs * steps_per_epoch)


def all_trainable(model, loss_fn) -> list[torch.nn.Parameter]:
    return [p for module in (model, loss_fn) for p in module.parameters() if p.requires_grad]


def build_optimizer_and_scheduler(cfg: RecipeConfig, model, loss_fn, max_steps: int, accelerator: Accelerator):
    o = cfg.optim
    scale = logit_scale(model)
    no_decay = [p for p in all_trainable(model, loss_fn) if p is scale or p.ndim == 0]  # temperatures, biases
    decay = [p for p in all_trainable(model, loss_fn) if all(p is not q for q in no_decay)]
    groups = [{"params": decay, "weight_decay": o.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    optimizer = accelerator.prepare(
        build_adamw(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, mixed_precision=accelerator.mixed_precision)
    )
    warmup = o.warmup_steps if o.warmup_steps is not None else int(round((o.warmup_ratio or 0.0) * max_steps))
    scheduler = get_scheduler(
        o.scheduler if o.scheduler != "constant" else "constant_with_warmup",
        optimizer=optimizer,
        num_warmup_steps=warmup,
        num_training_steps=max_steps,
    )
    # Not through prepare(): that would step the schedule once per process. Saved with the state.
    accelerator.register_for_checkpointing(scheduler)
    return optimizer, scheduler


def resume(accelerator: Accelerator, checkpoint: Path | None, cfg: RecipeConfig, out: Path) -> TrainerState:
    """Restore tensors, optimizer, scheduler and RNG; cut the log back to the checkpoint's step."""
    if checkpoint is None:
        return TrainerState(num_processes=accelerator.num_processes, config=cfg.model_dump(mode="json"))
    accelerator.load_state(str(checkpoint))
    state = TrainerState.from_json(read_trainer_state(checkpoint))
    if accelerator.is_main_process:
        truncate_log(out / TRAIN_LOG, state.step)
    accelerator.print(f"Resumed from {checkpoint} at step {state.step} (epoch {state.epoch}, batch {state.batches_done_in_epoch})")
    return state


# ----------------------------------------------------------------------------- loop helpers


def contrastive_batch_on_every_process(batch: dict, accelerator: Accelerator, gather: bool) -> bool:
    """False when unreadable images left some process's loss without a pair, or without a negative.

    One pair alone has no negative: its loss and gradient are exactly zero, a step that teaches nothing.
    """
    rows = torch.tensor([len(batch["image_index"])], device=accelerator.device)
    counts = accelerator.gather(rows) if accelerator.num_processes > 1 else rows  # (processes,)
    if gather:
        return bool(counts.min() >= 1 and counts.sum() >= 2)
    return bool(counts.min() >= 2)


def check_finite(loss, terms, state: TrainerState, scheduler) -> None:
    if not torch.isfinite(loss):
        raise TrainingError(
            f"non-finite loss at step {state.step + 1} (epoch {state.epoch}, batch {state.batches_done_in_epoch}): "
            + ", ".join(f"{k}={v.item()}" for k, v in terms.items())
            + f"; lr={scheduler.get_last_lr()[0]:.3g}. Lower optim.lr or use train.mixed_precision=bf16"
        )


def check_adapters_get_gradient(model) -> None:
    """The silent no-op: adapters that never receive gradient."""
    dead = [t for t, ok in lora_gradient_report(model).items() if not ok]
    if dead:
        raise TrainingError(
            f"LoRA adapters in the {', '.join(dead)} tower(s) got no gradient after the first step: "
            "check lora.<tower>.target_modules / layers"
        )


def checkpoint(accelerator: Accelerator, cfg: RecipeConfig, out: Path, state: TrainerState, pending_skipped: int) -> int:
    """Fold this process's unreadable-image count into the state, save; returns the new pending count (0)."""
    skipped = torch.tensor(pending_skipped, device=accelerator.device)
    state.skipped_images += int(accelerator.reduce(skipped, "sum").item())
    save_checkpoint(accelerator, out / CHECKPOINTS, state.step, state.to_json(), cfg.train.keep_last_checkpoints)
    return 0


def append_log(path: Path, record: dict) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop records past the checkpoint a run resumes from: they are about to be written again."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
        atomic_write_text(path, "".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------- artifacts


def write_artifacts(
    cfg,
    accelerator,
    model,
    processor,
    results,
    state: TrainerState,
    skipped_eval,
    eval_sets,
    out: Path,
    negatives_per_pair: float | None = None,
    class_prompts: dict | None = None,
) -> None:
    """Adapter + processor (+ extra trained tensors), results JSON/markdown/PNG, model cards."""
    if not accelerator.is_main_process:
        return
    adapter_dir = save_adapter(model, processor, out / ADAPTER)
    notes = eval_set_notes(eval_sets, class_prompts)
    lead = instance_recall_misleads(eval_sets)
    files = write_results(results, out / EVAL, set_notes=notes, lead_with_classes=lead)
    table = format_results_table(results, lead_with_classes=lead)
    accelerator.print("\n" + table)
    accelerator.print(f"Wrote {files['json']}, {files['md']}, {files['png']}")
    if cfg.data.eval.languages:  # per-language view of the same numbers
        languages = format_language_table(results, list(cfg.data.eval.languages), reference=REFERENCE)
        atomic_write_text(out / EVAL / "languages.md", languages + "\n")
        accelerator.print("\n" + languages + f"\nWrote {out / 'eval' / 'languages.md'}")
    if state.skipped_images or any(skipped_eval.values()):
        accelerator.print(f"Skipped unreadable images: train {state.skipped_images}, eval {skipped_eval}")
    if state.skipped_batches:
        accelerator.print(f"Skipped {state.skipped_batches} training batches left with fewer than two readable images on some process")
    for card in (out / "README.md", adapter_dir / "README.md"):  # the adapter folder travels alone
        write_model_card(
            card,
            cfg=cfg,
            results_table=table,
            trainable=trainable_parameters_by_tower(model),
            steps=state.step,
            train_seconds=state.train_seconds,
            num_processes=accelerator.num_processes,
            set_notes=notes,
            negatives_per_pair=negatives_per_pair,
        )
    accelerator.print(f"Adapter: {adapter_dir}  (load with finetune.models.adapter.load_adapted({str(out)!r}) or plain PEFT)")


# ----------------------------------------------------------------------------- processes and threads


def several_processes_on_cpu() -> bool:
    """Launched as N>1 processes (torchrun / `accelerate launch --multi_gpu`) on a machine without CUDA.

    Accelerate then needs `cpu=True` to form a gloo process group; without it every process would
    silently train alone on the whole dataset.
    """
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def share_cpu_threads() -> str | None:
    """On CPU, torch's threads as finetune/threads.py chooses them: the cores other processes leave free, shared
    among the local processes. `accelerate launch` without a config sets OMP_NUM_THREADS=1, which would use
    one core of many: that 1 is not taken as the user's choice; DOMAINCLIP_NUM_THREADS or any other
    OMP_NUM_THREADS wins. Returns the line to print."""
    if torch.cuda.is_available():
        return None
    return set_cpu_threads().describe()


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


if __name__ == "__main__":
    sys.exit(main())
