"""Small CLIP checkpoints built from configs: the demo's base model and the test suite's stand-ins.

The tokenizer is a byte-level BPE learned with `tokenizers` using CLIP's own normalizer,
pre-tokenizer and `</w>` word ends, so the real `CLIPTokenizer` loads it from the saved folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import pre_tokenizers, trainers
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

from finetune.model import save_processor

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def train_clip_tokenizer(texts: list[str], vocab_size: int, max_length: int = 32) -> CLIPTokenizer:
    """Learn vocab + merges on `texts`; everything else is CLIP's tokenizer pipeline."""
    empty = CLIPTokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend = empty.backend_tokenizer
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    return CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=max_length)


def tiny_clip_config(
    vocab_size: int, image_size: int = 32, width: int = 64, layers: int = 4, patch_size: int = 8, max_length: int = 32
) -> CLIPConfig:
    heads = max(1, width // 16)
    return CLIPConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            max_position_embeddings=max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            image_size=image_size,
            patch_size=patch_size,
        ),
        projection_dim=width,
    )


def build_tiny_clip(
    texts: list[str], *, vocab_size: int = 400, image_size: int = 32, width: int = 64, layers: int = 4, patch_size: int = 8
) -> tuple[CLIPModel, CLIPProcessor]:
    """An untrained CLIP with a tokenizer fitted to `texts` and a PIL image processor at `image_size`."""
    tokenizer = train_clip_tokenizer(texts, vocab_size)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model = CLIPModel(tiny_clip_config(len(tokenizer), image_size, width, layers, patch_size))
    return model, processor


def save_clip_folder(model: CLIPModel, processor: CLIPProcessor, out_dir: str | os.PathLike) -> Path:
    """A standard HF folder: config + safetensors + tokenizer + processor/preprocessor configs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    save_processor(processor, out_dir)
    return out_dir
