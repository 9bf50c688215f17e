"""Where a row becomes tensors: images through the checkpoint's image processor, captions through its
tokenizer. Unreadable images are dropped from the batch and counted, never fatal."""

from __future__ import annotations

import torch
from transformers import CLIPProcessor

from data_tools.loading import decode_image


class ImageTextCollator:
    """rows [{"image", "caption", "image_index"}] -> batch dict of tensors (plus `corrupt_images`)."""

    def __init__(self, processor: CLIPProcessor, max_text_length: int):
        self.processor = processor
        self.max_text_length = max_text_length

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        images, captions, index = [], [], []
        for row in rows:
            image = decode_image(row["image"])
            if image is None:
                continue
            images.append(image)
            captions.append(row["caption"])
            index.append(row["image_index"])
        batch = {"corrupt_images": torch.tensor(len(rows) - len(images)), "image_index": torch.tensor(index)}
        if images:
            batch["pixel_values"] = preprocess_images(self.processor, images)  # (B, 3, H, W)
            tokens = encode_captions(self.processor, captions, self.max_text_length)
            batch["input_ids"] = tokens["input_ids"]  # (B, L), L = longest caption in the batch
            batch["attention_mask"] = tokens["attention_mask"]
        return batch


def preprocess_images(processor: CLIPProcessor, images: list) -> torch.Tensor:
    """Resize, crop and normalise exactly as the checkpoint's image processor says."""
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def encode_captions(processor: CLIPProcessor, captions: list[str], max_text_length: int) -> dict[str, torch.Tensor]:
    """Pad to the longest caption (not to max length: most captions are short), truncate at the limit."""
    return processor.tokenizer(captions, padding=True, truncation=True, max_length=max_text_length, return_tensors="pt")
