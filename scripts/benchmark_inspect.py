"""Time `domainclip data inspect`'s work on a folder of N image files with a CSV of relative paths.

    python scripts/benchmark_inspect.py                  # 10,000 images of 64x64, prints JSON
    python scripts/benchmark_inspect.py --images 2000 --decode

Writes the images (random noise PNGs, ~12 KB each) and `meta.csv` into a temporary folder, then
loads the table and runs the report (hash + header check, or full decode with --decode) with the
demo model's tokenizer. Prints {"images", "seconds_load", "seconds_report", "decode", "cpus", "load_average"}.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from transformers import AutoTokenizer

from data_tools.inspect import inspect_pairs
from data_tools.loading import load_image_text_dataset

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--decode", action="store_true")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "images").mkdir()
        with (root / "meta.csv").open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "caption", "label"])
            for i in range(args.images):
                pixels = rng.integers(0, 256, size=(args.size, args.size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / "images" / f"{i:06d}.png")
                writer.writerow([f"images/{i:06d}.png", f"image number {i}", f"class{int(rng.zipf(1.5)) % 50}"])
        tokenizer = AutoTokenizer.from_pretrained(ROOT / "recipes" / "assets" / "demo-clip")
        start = time.perf_counter()
        pairs = load_image_text_dataset(key="data.train", path=str(root / "meta.csv"), label_column="label")
        loaded = time.perf_counter()
        report, _ = inspect_pairs(pairs, tokenizer=tokenizer, max_text_length=32, decode=args.decode)
        done = time.perf_counter()
    print(
        json.dumps(
            {
                "images": report["unique_images"],
                "seconds_load": round(loaded - start, 2),
                "seconds_report": round(done - loaded, 2),
                "decode": args.decode,
                "cpus": len(os.sched_getaffinity(0)),
                "load_average": round(os.getloadavg()[0], 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
