"""What augmentation costs the data pipeline: training images/s through the real loader with it off and
on, one JSON document.

    python scripts/benchmark_augment.py                      # 256 JPEGs 640x480 -> 224 px, 2 workers (~2 min on 2 cores)
    python scripts/benchmark_augment.py --tiny --workers 0   # seconds: the test's setting

Each configuration runs the training loader exactly as `finetune/train.py` builds it with augmentation
(DataLoader over `AugmentedRows` with `PositionKeys`, `ImageTextCollator` with the image settings:
decode with JPEG draft, resize + crop, augment, normalise, tokenize) for whole passes over the
images, configurations interleaved (off, crop, flip, ..., off, crop, ...) so a neighbour's load hits
all of them alike; the best pass of each counts. Settings are the schema defaults of each transform
with `enabled: true`, colour jitter with p=1 so every image pays for it (its default hue 0 skips the
HSV round trip; `color_jitter_with_hue` adds hue 0.05). `all_image` is every transform at its default.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from finetune.quiet import quiet_third_party_notices

quiet_third_party_notices()

import datasets  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from data_tools.augment import (  # noqa: E402
    AugmentedRows,
    ImageAugmentation,
    PositionKeys,
    TextAugmentation,
)
from data_tools.collate import ImageTextCollator  # noqa: E402
from data_tools.sampling import EpochShuffleSampler  # noqa: E402
from scripts.benchmark import build_processor, encoded_images, load_average  # noqa: E402

OFF = ImageAugmentation(
    crop=False,
    crop_scale=(0.8, 1.0),
    crop_ratio=(3 / 4, 4 / 3),
    flip=False,
    flip_p=0.5,
    rotation=False,
    rotation_degrees=10.0,
    rotation_padding="border",
    jitter=False,
    jitter_p=1.0,
    brightness=0.2,
    contrast=0.2,
    saturation=0.2,
    hue=0.0,
)
TEXT_OFF = TextAugmentation(word_dropout=0.0, word_swap=0.0, caption_templates=None)
TEXT_ON = TextAugmentation(word_dropout=0.1, word_swap=0.1, caption_templates=("{caption}", "a photo of {caption}"))
CONFIGS = {  # name -> (image settings or None, text settings)
    "off": (None, TEXT_OFF),
    "random_resized_crop": (dataclasses.replace(OFF, crop=True), TEXT_OFF),
    "horizontal_flip": (dataclasses.replace(OFF, flip=True), TEXT_OFF),
    "rotation": (dataclasses.replace(OFF, rotation=True), TEXT_OFF),
    "color_jitter": (dataclasses.replace(OFF, jitter=True), TEXT_OFF),
    "color_jitter_with_hue": (dataclasses.replace(OFF, jitter=True, hue=0.05), TEXT_OFF),
    "all_image": (dataclasses.replace(OFF, crop=True, flip=True, rotation=True, jitter=True), TEXT_OFF),
    "all_image_and_text": (dataclasses.replace(OFF, crop=True, flip=True, rotation=True, jitter=True), TEXT_ON),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="JPEGs per pass")
    parser.add_argument("--image-size", type=int, default=224, help="the processor's input side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (the recipes' data.num_workers)")
    parser.add_argument("--repeats", type=int, default=2, help="passes per configuration (the best counts)")
    parser.add_argument("--tiny", action="store_true", help="16 images at 32 px, one pass: a smoke test")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args(argv)


def rows(n: int, width: int, height: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict(
        {
            "image": encoded_images(n, "JPEG", width, height),
            "caption": [f"a photo-like image number {i} with smooth colours and noise" for i in range(n)],
            "image_index": list(range(n)),
            "source_row": list(range(n)),
            "image_id": [str(i) for i in range(n)],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(decode=False),
                "caption": datasets.Value("string"),
                "image_index": datasets.Value("int64"),
                "source_row": datasets.Value("int64"),
                "image_id": datasets.Value("string"),
            }
        ),
    )


def one_pass(pairs, processor, image, text, batch_size: int, workers: int, image_size: int) -> float:
    """Seconds for one pass over `pairs` through the training loader (workers started inside)."""
    sampler = PositionKeys(EpochShuffleSampler(len(pairs), seed=0))
    loader = DataLoader(
        AugmentedRows(pairs, 0, text),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        collate_fn=ImageTextCollator(processor, 77, draft_size=image_size, augment=image, augment_seed=0),
    )
    start = time.perf_counter()
    for batch in loader:
        assert batch["pixel_values"].shape[-1] == image_size
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.tiny:
        args.images, args.image_size, args.batch_size, args.repeats = 16, 32, 8, 1
    torch.set_num_threads(1)  # the workers do the work; as in a training run, the main process waits
    before = load_average()
    pairs = rows(args.images, 640 if not args.tiny else 64, 480 if not args.tiny else 48)
    processor = build_processor(args.image_size)
    images = args.images // args.batch_size * args.batch_size
    best: dict[str, float] = {}
    progress = tqdm(total=args.repeats * len(CONFIGS), desc="augment benchmark", file=sys.stderr)
    for _ in range(args.repeats):
        for name, (image, text) in CONFIGS.items():
            seconds = one_pass(pairs, processor, image, text, args.batch_size, args.workers, args.image_size)
            best[name] = min(best.get(name, float("inf")), seconds)
            progress.update(1)
    progress.close()
    rate = {name: round(images / seconds, 1) for name, seconds in best.items()}
    relative = {name: round(r / rate["off"], 3) for name, r in rate.items()}
    doc = {
        "benchmark": "augment",
        "machine": {
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "torch": torch.__version__,
        },
        "setting": {
            "images": images,
            "source": "JPEG 640x480 photo-like" if not args.tiny else "JPEG 64x48",
            "image_size": args.image_size,
            "batch_size": args.batch_size,
            "workers": args.workers,
            "repeats": args.repeats,
        },
        "images_per_s": rate,
        "relative_to_off": relative,
        "target": "all_image >= 0.8 x off images/s (augmentation costs at most 20% of the pipeline)",
        "met": relative["all_image"] >= 0.8,
        "load_average_before": before,
        "load_average_after": load_average(),
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
