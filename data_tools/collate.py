"""Where a row becomes tensors: images through the checkpoint's image processor, captions through its
tokenizer. Unreadable images are dropped from the batch and counted, never fatal. Captions longer
than the text tower's limit are cut; `count_truncated_captions` finds them before training starts."""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import CLIPProcessor

from data_tools.augment import ImageAugmentation, augment_images, import_kernels
from data_tools.loading import decode_image


class ImageTextCollator:
    """rows in the normal form -> batch dict (see `__call__`)."""

    def __init__(
        self,
        processor: CLIPProcessor,
        max_text_length: int,
        draft_size: int | None = None,
        augment: ImageAugmentation | None = None,
        augment_seed: int | None = None,
    ):
        self.processor = processor
        self.max_text_length = max_text_length
        self.draft_size = draft_size  # JPEGs decode at a reduced scale that still covers this side
        # Training only: rows then carry `augment_key` (epoch, position) from data_tools.augment.AugmentedRows.
        self.augment, self.augment_seed = augment, augment_seed
        if augment is not None:
            import_kernels()

    def __call__(self, rows: list[dict]) -> dict:
        """rows [{"image", "caption", "image_index", "source_row", "image_id", ("label")}] -> batch:

            pixel_values    (B, 3, H, W)   only when at least one image is readable
            input_ids       (B, L)         L = longest caption in the batch
            attention_mask  (B, L)
            image_index     (B,) int64     groups captions of one image (the loss's positives)
            source_row      (B,) int64     row of the loaded split
            image_id        list[str]      (B,)
            label           list[str]      (B,), when the rows carry labels
            label_id        (B,) int64     class id (-1 unlabelled), when the rows carry one
            corrupt_images  () int64       rows dropped because their image could not be read

        B counts surviving rows only, and every field is aligned with pixel_values. A batch whose
        images are all unreadable has B = 0 and no pixel_values; the loop skips it on every process.
        """
        kept = []
        images = []
        for row in rows:
            image = decode_image(row["image"], self.draft_size)
            if image is None:
                continue
            images.append(image)
            kept.append(row)
        batch = {
            "corrupt_images": torch.tensor(len(rows) - len(kept), dtype=torch.int64),
            # Explicit dtype: torch.tensor([]) would be float32 for an all-unreadable batch.
            "image_index": torch.tensor([row["image_index"] for row in kept], dtype=torch.int64),  # (B,)
            "source_row": torch.tensor([row["source_row"] for row in kept], dtype=torch.int64),  # (B,)
            "image_id": [str(row["image_id"]) for row in kept],
        }
        if rows and "label" in rows[0]:
            batch["label"] = [str(row["label"]) for row in kept]
        if rows and "label_id" in rows[0]:  # class id for label-aware losses; -1 = unlabelled
            batch["label_id"] = torch.tensor([row["label_id"] for row in kept], dtype=torch.int64)  # (B,)
        if images:
            if self.augment is None:
                batch["pixel_values"] = preprocess_images(self.processor, images)  # (B, 3, H, W)
            else:
                keys = [row["augment_key"] for row in kept]
                batch["pixel_values"] = preprocess_augmented_images(self.processor, images, keys, self.augment_seed, self.augment)
            tokens = encode_captions(self.processor, [row["caption"] for row in kept], self.max_text_length)
            batch["input_ids"] = tokens["input_ids"]  # (B, L), L = longest caption in the batch
            batch["attention_mask"] = tokens["attention_mask"]  # (B, L)
        return batch


def preprocess_images(processor: CLIPProcessor, images: list) -> torch.Tensor:
    """Resize, crop and normalise exactly as the checkpoint's image processor says."""
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def preprocess_augmented_images(
    processor: CLIPProcessor, images: list, keys: list[tuple[int, int]], seed: int, augment: ImageAugmentation
) -> torch.Tensor:
    """The processor's resize, crop and rescale to [0, 1]; the augmentation; then its normalisation."""
    image_processor = processor.image_processor
    pixels = image_processor(images=images, do_normalize=False, return_tensors="pt")["pixel_values"]  # (B, 3, H, W) in [0, 1]
    pixels = augment_images(pixels, keys, seed, augment)  # (B, 3, H, W)
    if not image_processor.do_normalize:  # a checkpoint whose processor does not normalise: neither do we
        return pixels
    mean = torch.tensor(image_processor.image_mean, dtype=pixels.dtype)[:, None, None]  # (3, 1, 1)
    std = torch.tensor(image_processor.image_std, dtype=pixels.dtype)[:, None, None]  # (3, 1, 1)
    return (pixels - mean) / std


def encode_captions(processor: CLIPProcessor, captions: list[str], max_text_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest caption (not to max length: most captions are short), truncate at the limit."""
    return processor.tokenizer(captions, padding=True, truncation=True, max_length=max_text_length, return_tensors="pt")


class TruncatedCaption(NamedTuple):
    caption: str  # the whole caption as written
    cut: str  # the words the text tower never sees (from the word the limit falls in)


# Captions tokenized per call: bounds the memory of the untruncated token lists on large sets.
_TOKENIZE_CHUNK = 4096


def count_truncated_captions(tokenizer, captions: list[str], max_text_length: int) -> tuple[int, TruncatedCaption | None]:
    """How many captions have more than `max_text_length` tokens (special tokens included), and the first.

    The example names the words that would be cut, so a user sees what the model loses (often the
    words that carry the class, at the end of long captions). None when nothing is cut.
    """
    count, first = 0, None
    for start in range(0, len(captions), _TOKENIZE_CHUNK):
        chunk = list(captions[start : start + _TOKENIZE_CHUNK])
        # verbose=False: the tokenizer's own "longer than the maximum" warning is what this replaces.
        lengths = [len(ids) for ids in tokenizer(chunk, truncation=False, verbose=False)["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > max_text_length]
        count += len(over)
        if over and first is None:
            first = _truncated_example(tokenizer, chunk[over[0]], max_text_length)
    return count, first


def _truncated_example(tokenizer, caption: str, max_text_length: int) -> TruncatedCaption:
    encoding = tokenizer(caption, truncation=False, verbose=False, return_special_tokens_mask=True, return_offsets_mapping=True)
    content = [i for i, special in enumerate(encoding["special_tokens_mask"]) if not special]
    kept = max_text_length - tokenizer.num_special_tokens_to_add(pair=False)  # content tokens that survive
    first_cut = content[max(kept, 0)]
    char = encoding["offset_mapping"][first_cut][0]
    while char > 0 and not caption[char - 1].isspace():  # report whole words: back up to the word start
        char -= 1
    return TruncatedCaption(caption=caption, cut=caption[char:].strip())


def format_truncation_warning(
    key: str, count: int, total: int, example: TruncatedCaption, max_text_length: int, model_max_length: int
) -> str:
    """One warning line for a dataset whose captions will be cut, with the recipe key that fixes it."""
    if max_text_length < model_max_length:
        fix = f"raise data.max_text_length (now {max_text_length}, up to the model's limit of {model_max_length}) or shorten the captions"
    else:
        fix = f"data.max_text_length is already the model's limit ({model_max_length}): shorten the captions"
    return (
        f"warning: {key}: {count} of {total} captions are longer than {max_text_length} tokens and will be cut; "
        f"e.g. {example.caption!r} loses {example.cut!r}. To keep them, {fix}."
    )
