"""PyTorch fp32 vs the export's ONNX towers (fp32, and int8 when the export holds them), side by side; prints JSON.

    python scripts/benchmark_onnx.py EXPORT_DIR [--batch 1,256] [--repeats 7] [--threads N]

EXPORT_DIR is a folder written by `domainclip export RUN --out EXPORT_DIR --onnx` (or `--onnx-int8`). Every
variant embeds the same preprocessed batch (generated target-domain images and their captions, through the
export's processor and tokenizer), with the same thread count (torch intra-op threads = onnxruntime intra-op
threads = --threads, default torch's), taking turns in every repeat so a neighbour's load hits all alike.
Per batch size and variant: images/s, captions/s (medians), the ratio to PyTorch fp32, and the smallest
cosine of its embeddings with PyTorch fp32's. Preprocessing and tokenising are not timed (they are the same
code for every variant).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch  # noqa: E402


def main(argv=None) -> int:
    from data_tools.collate import encode_captions, preprocess_images
    from data_tools.synthetic.domains import generate_domain
    from finetune.export.merge import read_manifest
    from finetune.export.onnx import ONNX_DIR, ImageTower, TextTower, measure_side_by_side, row_cosines
    from finetune.models.load import load_model
    from finetune.quiet import quiet_third_party_notices
    from finetune.retrieval.embedders import OnnxEmbedder, OnnxTowers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export_dir")
    parser.add_argument("--batch", default="1,256", help="comma-separated batch sizes")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="default: torch.get_num_threads()")
    args = parser.parse_args(argv)
    quiet_third_party_notices()

    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    manifest = read_manifest(args.export_dir)
    OnnxEmbedder(args.export_dir, num_threads=threads)  # the same checks and errors as the service's loader
    model, processor = load_model(args.export_dir)  # fp32, whatever --dtype the export was written with
    model = model.float().eval()
    image_tower, text_tower = ImageTower(model).eval(), TextTower(model).eval()
    onnx_dir = Path(args.export_dir) / ONNX_DIR
    sessions = {
        f"onnx_{kind}": OnnxTowers(onnx_dir, {n: f["file"] for n, f in files.items()}, num_threads=threads)
        for kind, files in manifest["onnx"]["files"].items()
    }

    batches = [int(b) for b in args.batch.split(",") if b.strip()]
    data = generate_domain("target", max(batches), captions_per_image=1, image_size=64, seed=5)
    rows = {}
    for batch in batches:
        pixels = preprocess_images(processor, data["image"][:batch])  # (B, 3, H, W)
        tokens = encode_captions(processor, [c[0] for c in data["caption"][:batch]], manifest["max_text_length"])
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        pix_np, ids_np, mask_np = pixels.numpy(), ids.numpy(), mask.numpy()
        runners = {"pytorch_fp32": (lambda: image_tower(pixels), lambda: text_tower(ids, mask))}
        for name, s in sessions.items():
            runners[name] = (lambda s=s: s.image_embeddings(pix_np), lambda s=s: s.text_embeddings(ids_np, mask_np))
        speed = measure_side_by_side(runners, batch, batch, repeats=args.repeats)
        with torch.no_grad():
            ref_image, ref_text = image_tower(pixels).numpy(), text_tower(ids, mask).numpy()
        base = speed["pytorch_fp32"]
        per_variant = {}
        for name, s in speed.items():
            entry = {
                **s,
                "images_ratio_vs_pytorch_fp32": round(s["images_per_s"] / base["images_per_s"], 3),
                "captions_ratio_vs_pytorch_fp32": round(s["captions_per_s"] / base["captions_per_s"], 3),
            }
            if name in sessions:
                image = sessions[name].image_embeddings(pix_np)
                text = sessions[name].text_embeddings(ids_np, mask_np)
                entry["min_cosine_vs_pytorch_fp32"] = round(
                    float(min(row_cosines(image, ref_image).min(), row_cosines(text, ref_text).min())), 6
                )
            per_variant[name] = entry
        rows[str(batch)] = per_variant
    doc = {
        "export_dir": str(args.export_dir),
        "architecture": manifest["architecture"],
        "embedding_dim": manifest["embedding_dim"],
        "threads": threads,
        "repeats": args.repeats,
        "opset": manifest["onnx"]["opset"],
        "onnx_bytes": {kind: sum(f["bytes"] for f in files.values()) for kind, files in manifest["onnx"]["files"].items()},
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "batches": rows,
    }
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
