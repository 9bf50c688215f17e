"""Build the demo's base CLIP: a small BPE tokenizer and a tiny CLIP pretrained on the source domain.

    python scripts/pretrain_base.py --out recipes/assets/demo-clip

The result is a standard Hugging Face folder (config.json, model.safetensors, tokenizer files,
preprocessor config) that loads with `CLIPModel.from_pretrained` / `CLIPProcessor.from_pretrained`,
exactly like a hub checkpoint. It plays the part of "zero-shot CLIP" in the offline demo: good on the
source domain it was trained on, poor on the shifted target domain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from data_tools.synthetic.domains import all_caption_text, generate_domain
from finetune.models.tiny_clip import build_tiny_clip, save_clip_folder
from finetune.training.losses import ClipInfoNCE
from finetune.training.step import contrastive_step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="recipes/assets/demo-clip")
    parser.add_argument("--images", type=int, default=6000, help="source-domain training images")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=124,
        help="learned BPE tokens, on top of the 514 every tokenizer holds (special tokens, each byte bare and word-final)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    model, processor = build_tiny_clip(
        all_caption_text(seed=args.seed),
        vocab_size=args.vocab_size,
        image_size=args.image_size,
        width=args.width,
        layers=args.layers,
        patch_size=args.patch_size,
    )
    image_processor, tokenizer = processor.image_processor, processor.tokenizer

    data = generate_domain("source", args.images, captions_per_image=3, image_size=args.image_size, seed=args.seed + 1000)
    pixels = image_processor(images=data["image"], return_tensors="pt")["pixel_values"]  # (N, 3, H, W)
    flat = [c for caps in data["caption"] for c in caps]
    tokens = tokenizer(flat, padding=True, max_length=32, truncation=True, return_tensors="pt")
    ids = tokens["input_ids"].view(args.images, 3, -1)  # (N, 3, L)
    mask = tokens["attention_mask"].view(args.images, 3, -1)

    loss_fn = ClipInfoNCE()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    rng = np.random.default_rng(args.seed)
    started = time.time()
    model.train()
    for _ in (bar := tqdm(range(args.steps), desc="pretrain (source)")):
        rows = torch.from_numpy(rng.choice(args.images, size=args.batch_size, replace=False))
        pick = torch.from_numpy(rng.integers(0, 3, size=args.batch_size))
        batch = {"pixel_values": pixels[rows], "input_ids": ids[rows, pick], "attention_mask": mask[rows, pick], "image_index": rows}
        loss, _ = contrastive_step(model, batch, loss_fn, gather=False)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    out_dir = save_clip_folder(model, processor, args.out)
    print(json.dumps({"out": str(out_dir), "seconds": round(time.time() - started, 1), "final_loss": loss.item()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
