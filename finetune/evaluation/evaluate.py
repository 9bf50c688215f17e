"""Embed an eval split and score retrieval both ways (see finetune/evaluation/metrics.py for the definitions).

Images: each process embeds a contiguous shard of the unique images, read from the Arrow-backed
pairs dataset and decoded + preprocessed by DataLoader workers; the shards are gathered in process
order, so every process scores the same full set. No process ever holds the whole set's bytes.

Captions: each distinct caption text is embedded once and mapped back to every caption that uses
it, so identical texts get bit-identical embeddings and their exact ties are real ties in the
metrics. The distinct texts are sharded across processes the same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data_tools.collate import encode_captions, preprocess_images
from data_tools.loading import RetrievalSet, decode_image
from finetune.errors import DataLoadError
from finetune.evaluation.metrics import (
    class_prompt_embedding,
    class_retrieval_metrics,
    classification_metrics,
    frequency_groups,
    group_means,
    per_class_t2i_recall,
    retrieval_metrics,
    retrieval_ranks,
)
from finetune.models.lora import encode_images, encode_texts


def shard_range(n: int, num_processes: int, process_index: int) -> range:
    """The contiguous block of 0..n-1 that one process embeds; blocks in process order cover 0..n-1.

    Sizes differ by at most one, and a process may get an empty block (n < num_processes).
    """
    per, extra = divmod(n, num_processes)
    start = process_index * per + min(process_index, extra)
    return range(start, start + per + (process_index < extra))


def _my_shard(n: int, accelerator: Accelerator | None) -> range:
    if accelerator is None:
        return range(n)
    return shard_range(n, accelerator.num_processes, accelerator.process_index)


def _gather(item, accelerator: Accelerator | None) -> list:
    """[item of process 0, item of process 1, ...]. Every process must call it, even with nothing to add."""
    if accelerator is None or accelerator.num_processes == 1:
        return [item]
    return gather_object([item])  # gather_object flattens one level: wrap so each process adds one item


class _EvalImageCollator:
    """Runs in the DataLoader workers: decode + preprocess a batch of image values, note which failed."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, rows: list[dict]) -> dict:
        decoded = [decode_image(row["image"]) for row in rows]
        good = [image for image in decoded if image is not None]
        return {
            "valid": torch.tensor([image is not None for image in decoded], dtype=torch.bool),  # (B,)
            "pixel_values": preprocess_images(self.processor, good) if good else None,  # (B_valid, 3, H, W)
        }


@torch.no_grad()
def embed_retrieval_set(
    model: torch.nn.Module,
    processor,
    rset: RetrievalSet,
    *,
    batch_size: int,
    max_text_length: int,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    name: str = "eval",
    desc: str | None = None,
) -> dict:
    """Returns image_emb (N_img, D), text_emb (N_txt, D), text_to_image (N_txt,), corrupt_images (int),
    image_valid (N_img,) bool: rows of image_emb are the readable images in set order.

    Images PIL cannot read are dropped together with their captions and counted. With several
    processes, call it on every process with the same set: the gathers are collective.

    Raises:
        DataLoadError: when no image of the set can be read (naming the set as `name`).
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    show = accelerator is None or accelerator.is_local_main_process
    desc = desc or name

    # -- images: this process's contiguous shard, decoded in workers
    shard = _my_shard(rset.num_images, accelerator)
    shard_pairs = rset.pairs.select(rset.image_rows[shard.start : shard.stop].tolist()).select_columns(["image"])
    loader = DataLoader(
        shard_pairs, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=_EvalImageCollator(processor)
    )
    chunks, valid = [], []
    for batch in tqdm(loader, desc=f"{desc}: images", disable=not show, leave=False):
        valid.append(batch["valid"])
        if batch["pixel_values"] is not None:
            with _autocast(accelerator):
                chunks.append(encode_images(model, batch["pixel_values"].to(device)).float().cpu())  # (B_valid, D)
    # A shard with no readable image still takes part in the gather, with None.
    local = (torch.cat(chunks) if chunks else None, torch.cat(valid) if valid else torch.zeros(0, dtype=torch.bool))
    gathered = _gather(local, accelerator)
    image_parts = [emb for emb, _ in gathered if emb is not None]
    valid_mask = torch.cat([mask for _, mask in gathered]).numpy()  # (N_img,) in process order == set order
    corrupt = int((~valid_mask).sum())
    if not image_parts:
        model.train(was_training)
        raise DataLoadError(
            f"eval set {name!r}: all {rset.num_images} images are unreadable (PIL could not decode any of them); "
            "check its image column and files"
        )
    image_emb = torch.cat(image_parts)  # (N_valid, D)

    # -- captions of readable images: each distinct text once, sharded, mapped back
    keep_text = valid_mask[rset.text_to_image]  # (N_txt,)
    kept_captions = [c for c, keep in zip(rset.captions, keep_text) if keep]
    distinct = list(dict.fromkeys(kept_captions))  # first-appearance order, identical on every process
    position = {text: i for i, text in enumerate(distinct)}
    text_shard = _my_shard(len(distinct), accelerator)
    text_chunks = []
    starts = range(text_shard.start, text_shard.stop, batch_size)
    for start in tqdm(starts, desc=f"{desc}: captions", disable=not show, leave=False):
        tokens = encode_captions(processor, distinct[start : min(start + batch_size, text_shard.stop)], max_text_length)
        with _autocast(accelerator):
            emb = encode_texts(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        text_chunks.append(emb.float().cpu())  # (b, D)
    text_parts = [emb for emb in _gather(torch.cat(text_chunks) if text_chunks else None, accelerator) if emb is not None]
    distinct_emb = torch.cat(text_parts)  # (N_distinct, D)
    model.train(was_training)

    # Renumber the surviving images; every caption row points at its text's single embedding.
    new_index = np.cumsum(valid_mask) - 1
    text_rows = torch.as_tensor([position[c] for c in kept_captions], dtype=torch.int64)  # (N_kept_txt,)
    return {
        "image_emb": image_emb,
        "text_emb": distinct_emb[text_rows],  # (N_kept_txt, D)
        "text_to_image": torch.from_numpy(new_index[rset.text_to_image[keep_text]].astype(np.int64)),
        "corrupt_images": corrupt,
        "image_valid": torch.from_numpy(valid_mask),  # (N_img,) which unique images were readable
    }


def _autocast(accelerator: Accelerator | None):
    return accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)


@torch.no_grad()
def label_aware_metrics(
    model: torch.nn.Module,
    processor,
    rset: RetrievalSet,
    emb: dict,
    *,
    prompts: dict[str, list[str]] | None,
    class_counts: dict[str, int] | None,
    max_text_length: int,
    ks: tuple[int, ...],
) -> dict:
    """Class-level numbers of one labelled eval set (see finetune/evaluation/metrics.py):

        classification   top1, top5 (>= 5 classes), macro_top1: images vs prompt-ensemble class embeddings
        class_retrieval  t2i_P@K, t2i_mAP@K (one query per class prompt), i2i_P@K
        long_tail        t2i_R@1 and accuracy averaged over head / medium / tail classes
        per_class        {class: {count, group, t2i_R@1, accuracy}}

    `prompts` maps each class to its prompt texts (finetune/evaluation/prompts.py; None: the bare labels).
    Head / medium / tail come from `class_counts` (the training set's pairs per class) when given,
    else from this set's images per class.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels = [label for label, ok in zip(rset.labels, emb["image_valid"].tolist()) if ok]  # (N_valid,)
    classes = sorted(set(labels))
    class_id = {c: i for i, c in enumerate(classes)}
    image_class = torch.tensor([class_id[label] for label in labels], dtype=torch.long)  # (N_valid,)

    texts = [(prompts or {}).get(c) or [c] for c in classes]  # a class without prompts: its bare label
    flat = [t for class_texts in texts for t in class_texts]  # (P,)
    prompt_class = torch.arange(len(classes)).repeat_interleave(torch.tensor([len(t) for t in texts]))  # (P,)
    prompt_emb = []
    for start in range(0, len(flat), 256):
        tokens = encode_captions(processor, flat[start : start + 256], max_text_length)
        prompt_emb.append(encode_texts(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu())
    model.train(was_training)
    prompt_emb = torch.cat(prompt_emb)  # (P, D)
    class_emb = class_prompt_embedding(prompt_emb, prompt_class, len(classes))  # (C, D)

    classification, accuracy = classification_metrics(emb["image_emb"], class_emb, image_class, ks=(1, 5))
    class_retrieval = class_retrieval_metrics(
        prompt_emb,
        prompt_class,
        emb["image_emb"],
        image_class,
        ks=tuple(k for k in ks if k in (1, 5, 10)) or (1,),
    )
    ranks = retrieval_ranks(emb["image_emb"], emb["text_emb"], emb["text_to_image"])
    recall = per_class_t2i_recall(ranks["t2i"], image_class[emb["text_to_image"]], len(classes), k=1)
    counts = {c: int(class_counts.get(c, 0)) for c in classes} if class_counts else {c: labels.count(c) for c in classes}
    groups = frequency_groups(counts)
    per_class = {c: {"count": counts[c], "group": groups[c], "t2i_R@1": recall[i], "accuracy": accuracy[i]} for i, c in enumerate(classes)}
    long_tail = {}
    for metric, values in (("t2i_R@1", recall), ("accuracy", accuracy)):
        for group, mean in group_means(dict(zip(classes, values)), groups).items():
            long_tail[f"{group}_{metric}"] = mean
    return {"classification": classification, "class_retrieval": class_retrieval, "long_tail": long_tail, "per_class": per_class}


def evaluate_retrieval(
    model: torch.nn.Module,
    processor,
    sets: dict[str, RetrievalSet],
    *,
    batch_size: int,
    max_text_length: int,
    ks: tuple[int, ...] = (1, 5, 10),
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    desc: str = "",
    class_prompts: dict | None = None,
    class_counts: dict[str, int] | None = None,
) -> tuple[dict, dict]:
    """{set name: {"t2i": {...}, "i2t": {...}, (label-aware keys)}} and {set name: corrupt image count}.

    `num_workers` DataLoader processes decode and preprocess the images (the recipe's data.num_workers).
    A set with labels also gets `label_aware_metrics`, with its class prompts from `class_prompts`
    ({set: finetune.evaluation.prompts.ClassPrompts}; the bare labels for a set without an entry).
    """
    results, corrupt = {}, {}
    for name, rset in sets.items():
        emb = embed_retrieval_set(
            model,
            processor,
            rset,
            batch_size=batch_size,
            max_text_length=max_text_length,
            num_workers=num_workers,
            accelerator=accelerator,
            name=name,
            desc=f"{desc} {name}".strip(),
        )
        results[name] = retrieval_metrics(emb["image_emb"], emb["text_emb"], emb["text_to_image"], ks=tuple(ks))
        if rset.labels is not None:
            set_prompts = (class_prompts or {}).get(name)
            results[name].update(
                label_aware_metrics(
                    model,
                    processor,
                    rset,
                    emb,
                    prompts=set_prompts.prompts if set_prompts is not None else None,
                    class_counts=class_counts,
                    max_text_length=max_text_length,
                    ks=tuple(ks),
                )
            )
        corrupt[name] = emb["corrupt_images"]
    return results, corrupt


def baseline_results(
    model: torch.nn.Module,
    processor,
    train_set: RetrievalSet,
    sets: dict[str, RetrievalSet],
    *,
    kinds: tuple[str, ...] = ("linear_probe", "knn"),
    batch_size: int,
    max_text_length: int,
    num_workers: int = 0,
    accelerator: Accelerator | None = None,
    seed: int = 0,
) -> tuple[dict, dict]:
    """({"linear_probe": {set: {...}}, "knn": {set: {...}}}, {kind: what the held-out selection picked}):
    the cheap options on the frozen model's image features, fitted on the labelled training set and scored on
    each labelled eval set. Each set gets {"classification": {"top1", "macro_top1"}, "per_class": {class: {"accuracy"}}}. Call with the base (unadapted) model; every process computes the
    same numbers (the embeddings are gathered), so any may report them.
    """
    from finetune.evaluation.baselines import classification_scores, knn, linear_probe

    labelled = {name: rset for name, rset in sets.items() if rset.labels is not None}
    if train_set.labels is None or not labelled or not kinds:
        return {}, {}

    def features(rset: RetrievalSet, name: str) -> tuple[torch.Tensor, list[str]]:
        emb = embed_retrieval_set(
            model, processor, rset, batch_size=batch_size, max_text_length=max_text_length, num_workers=num_workers,
            accelerator=accelerator, name=name, desc=f"baselines: {name}",
        )  # fmt: skip
        valid = emb["image_valid"].tolist()
        return F.normalize(emb["image_emb"].float(), dim=-1), [label for label, ok in zip(rset.labels, valid) if ok]

    train_features, train_labels = features(train_set, "data.train")
    tests = {name: features(rset, name) for name, rset in labelled.items()}
    # One fit (and one selection of C or k) per baseline, on the training rows only, then every set is scored.
    all_features = torch.cat([f for f, _ in tests.values()]).numpy()  # (sum N_valid, D)
    all_labels = [label for _, labels in tests.values() for label in labels]
    fitters = {"linear_probe": linear_probe, "knn": knn}
    out: dict = {kind: {} for kind in kinds}
    chosen: dict = {}
    for kind in kinds:
        result = fitters[kind](train_features.numpy(), train_labels, all_features, all_labels, seed=seed)
        chosen[kind] = result.chosen
        start = 0
        for name, (_, labels) in tests.items():
            top1, macro, per_class = classification_scores(result.predictions[start : start + len(labels)], labels)
            start += len(labels)
            out[kind][name] = {
                "classification": {"top1": top1, "macro_top1": macro},
                "per_class": {c: {"accuracy": a} for c, a in per_class.items()},
            }
    return out, chosen
