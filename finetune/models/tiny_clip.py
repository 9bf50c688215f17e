"""Small CLIP checkpoints built from configs: the demo's base model and the test suite's stand-ins.

The tokenizer is a byte-level BPE learned with `tokenizers` using CLIP's own normalizer,
pre-tokenizer and `</w>` word ends, so the real `CLIPTokenizer` loads it from the saved folder.
Like OpenAI's vocabulary it holds every byte symbol both bare and word-final (`x</w>`): CLIP uses
one token for unknown, end-of-text and padding and pools text at the first end-of-text, so a
symbol missing from the vocabulary would silently cut the caption there.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import pre_tokenizers, trainers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from finetune.models.load import save_processor

SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]
END_OF_WORD = "</w>"
BYTE_SYMBOLS = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 characters ByteLevel maps bytes to
# Special tokens, then every byte symbol word-final and bare: what any text can fall back to.
FIXED_VOCAB_SIZE = len(SPECIAL_TOKENS) + 2 * len(BYTE_SYMBOLS)


def train_clip_tokenizer(texts: list[str], vocab_size: int, max_length: int = 32) -> CLIPTokenizer:
    """Learn up to `vocab_size` BPE tokens on `texts`; everything else is CLIP's tokenizer pipeline.

    `vocab_size` counts the learned tokens only. On top of them the vocabulary always holds the
    `FIXED_VOCAB_SIZE` (514) tokens no text can do without: the two special tokens (ids 0 and 1)
    and each of the 256 byte symbols with and without `</w>`, so `len(tokenizer)` is at most
    `FIXED_VOCAB_SIZE + vocab_size` (fewer when `texts` run out of pairs to merge).
    """
    if vocab_size < 0:
        raise ValueError(f"vocab_size counts learned BPE tokens and must be >= 0, got {vocab_size}")
    empty = CLIPTokenizer()
    # Left alone, the trainer adds `x</w>` only for characters that end a word in `texts`. Seeding the
    # word-final forms as trainer special tokens puts all 256 in the vocabulary before training; the
    # trainer reuses those ids when it splits words into symbols, so merges still build on them.
    trainer = trainers.BpeTrainer(
        vocab_size=FIXED_VOCAB_SIZE + vocab_size,
        special_tokens=SPECIAL_TOKENS + [symbol + END_OF_WORD for symbol in BYTE_SYMBOLS],
        end_of_word_suffix=END_OF_WORD,
        initial_alphabet=BYTE_SYMBOLS,
        show_progress=False,
    )
    backend = empty.backend_tokenizer
    backend.train_from_iterator(texts, trainer)
    model = json.loads(backend.to_str())["model"]
    vocab = model["vocab"]
    missing = [t for t in SPECIAL_TOKENS + BYTE_SYMBOLS if t not in vocab]
    missing += [s + END_OF_WORD for s in BYTE_SYMBOLS if s + END_OF_WORD not in vocab]
    if missing:
        raise RuntimeError(
            f"the trained BPE vocabulary lacks {len(missing)} fixed tokens, e.g. {missing[:5]}: "
            "text containing them would be cut at the unknown (= end-of-text) token"
        )
    if [vocab[t] for t in SPECIAL_TOKENS] != [0, 1]:
        raise RuntimeError(
            f"{SPECIAL_TOKENS} must have ids 0 and 1 (tiny_clip_config's bos/eos ids), got {[vocab[t] for t in SPECIAL_TOKENS]}"
        )
    # Only vocab + merges come from training: building a fresh CLIPTokenizer from them means the
    # seeded `x</w>` forms are ordinary vocabulary entries, not added/special tokens.
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in model["merges"]], model_max_length=max_length)


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
    texts: list[str], *, vocab_size: int, image_size: int = 32, width: int = 64, layers: int = 4, patch_size: int = 8
) -> tuple[CLIPModel, CLIPProcessor]:
    """An untrained CLIP with a tokenizer fitted to `texts` and a PIL image processor at `image_size`.

    `vocab_size` is the tokenizer's learned part (see `train_clip_tokenizer`); the text tower's
    embedding table is sized to the whole tokenizer.
    """
    tokenizer = train_clip_tokenizer(texts, vocab_size)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
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
