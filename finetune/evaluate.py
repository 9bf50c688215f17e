"""Embed an eval split and score retrieval both ways (see finetune/metrics.py for the definitions).

With several processes each embeds a contiguous shard; the shards are gathered in order so every
process scores the same full set.
"""

from __future__ import annotations

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from data_tools.loading import RetrievalSet, decode_image
from finetune.collate import encode_captions, preprocess_images
from finetune.metrics import retrieval_metrics
from finetune.model import encode_images, encode_texts


def _shard(n: int, accelerator: Accelerator | None) -> range:
    if accelerator is None or accelerator.num_processes == 1:
        return range(n)
    per = -(-n // accelerator.num_processes)
    start = accelerator.process_index * per
    return range(min(start, n), min(start + per, n))


def _gather(items: list, accelerator: Accelerator | None) -> list:
    if accelerator is None or accelerator.num_processes == 1:
        return items
    return gather_object(items)


@torch.no_grad()
def embed_retrieval_set(
    model: torch.nn.Module,
    processor,
    rset: RetrievalSet,
    *,
    batch_size: int,
    max_text_length: int,
    accelerator: Accelerator | None = None,
    desc: str = "eval",
) -> dict:
    """Returns image_emb (N_img, D), text_emb (N_txt, D), text_to_image (N_txt,), corrupt_images (int).

    Images PIL cannot read are dropped together with their captions and counted.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    show = accelerator is None or accelerator.is_local_main_process

    image_rows = _shard(len(rset.images), accelerator)
    image_chunks, valid = [], []
    for start in tqdm(range(image_rows.start, image_rows.stop, batch_size), desc=f"{desc}: images", disable=not show, leave=False):
        decoded = [decode_image(rset.images[i]) for i in range(start, min(start + batch_size, image_rows.stop))]
        valid.extend(img is not None for img in decoded)
        good = [img for img in decoded if img is not None]
        if good:
            pixels = preprocess_images(processor, good).to(device)
            with _autocast(accelerator):
                image_chunks.append(encode_images(model, pixels).float().cpu())

    text_rows = _shard(len(rset.captions), accelerator)
    text_chunks = []
    for start in tqdm(range(text_rows.start, text_rows.stop, batch_size), desc=f"{desc}: captions", disable=not show, leave=False):
        tokens = encode_captions(processor, rset.captions[start : min(start + batch_size, text_rows.stop)], max_text_length)
        with _autocast(accelerator):
            text_chunks.append(
                encode_texts(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device)).float().cpu()
            )

    image_emb = torch.cat([c for chunk in _gather([image_chunks], accelerator) for c in chunk])  # (N_valid, D)
    text_emb = torch.cat([c for chunk in _gather([text_chunks], accelerator) for c in chunk])  # (N_txt, D)
    valid_mask = np.asarray([v for part in _gather([valid], accelerator) for v in part], dtype=bool)
    model.train(was_training)

    # Drop captions of unreadable images and renumber the survivors.
    new_index = np.cumsum(valid_mask) - 1
    keep_text = valid_mask[rset.text_to_image]
    return {
        "image_emb": image_emb,
        "text_emb": text_emb[torch.from_numpy(keep_text)],
        "text_to_image": torch.from_numpy(new_index[rset.text_to_image[keep_text]]),
        "corrupt_images": int((~valid_mask).sum()),
    }


def _autocast(accelerator: Accelerator | None):
    return accelerator.autocast() if accelerator is not None else torch.autocast("cpu", enabled=False)


def evaluate_retrieval(
    model: torch.nn.Module,
    processor,
    sets: dict[str, RetrievalSet],
    *,
    batch_size: int,
    max_text_length: int,
    ks: tuple[int, ...] = (1, 5, 10),
    accelerator: Accelerator | None = None,
    desc: str = "",
) -> tuple[dict, dict]:
    """{set name: {"t2i": {...}, "i2t": {...}}} and {set name: corrupt image count}."""
    results, corrupt = {}, {}
    for name, rset in sets.items():
        emb = embed_retrieval_set(
            model, processor, rset, batch_size=batch_size, max_text_length=max_text_length,
            accelerator=accelerator, desc=f"{desc} {name}".strip(),
        )
        results[name] = retrieval_metrics(emb["image_emb"], emb["text_emb"], emb["text_to_image"], ks=tuple(ks))
        corrupt[name] = emb["corrupt_images"]
    return results, corrupt
