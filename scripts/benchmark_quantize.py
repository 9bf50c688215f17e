"""Int8 / half-precision candidates for CPU inference, measured side by side with fp32; prints JSON.

    python scripts/benchmark_quantize.py recipes/assets/demo-clip [--batch 256] [--repeats 7]

MODEL is any CLIP folder (an export folder too). Rows: fp32, fp16, bf16, int8 (torch dynamic quantization,
the path `domainclip export --dtype int8` uses) and, when torchao is installed, torchao's int8
dynamic-activation / int8-weight config. Each row: images/s and captions/s, the ratio to fp32 measured in
the same interleaved loop, and the largest cosine error of its embeddings against fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings

import torch  # noqa: E402


def torchao_int8(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            quantize_,
        )

        model = copy.deepcopy(model)
        quantize_(model, Int8DynamicActivationInt8WeightConfig())
        return model


def main(argv=None) -> int:
    from data_tools.collate import encode_captions, preprocess_images
    from data_tools.synthetic.domains import generate_domain
    from finetune.export.quantize import embedding_throughput, quantize
    from finetune.models.load import load_model
    from finetune.models.towers import image_features, text_features

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-torchao", action="store_true")
    args = parser.parse_args(argv)

    model, processor = load_model(args.model)
    model.eval()
    data = generate_domain("target", args.batch, captions_per_image=1, image_size=32, seed=5)
    pixels = preprocess_images(processor, data["image"])
    tokens = encode_captions(processor, [c[0] for c in data["caption"]], processor.tokenizer.model_max_length)
    models = {name: quantize(model, name) for name in ("fp32", "fp16", "bf16", "int8")}
    if not args.no_torchao:
        try:
            models["torchao-int8"] = torchao_int8(model)
        except Exception as exc:  # not installed / no kernel for this CPU: say so, keep the rest
            print(f"torchao skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    speed = embedding_throughput(models, pixels, tokens["input_ids"], tokens["attention_mask"], repeats=args.repeats)
    with torch.no_grad():
        ref_i = torch.nn.functional.normalize(image_features(model, pixels).float(), dim=-1)
        ref_t = torch.nn.functional.normalize(text_features(model, tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1)
        rows = {}
        for name, m in models.items():
            i = torch.nn.functional.normalize(image_features(m, pixels).float(), dim=-1)
            t = torch.nn.functional.normalize(text_features(m, tokens["input_ids"], tokens["attention_mask"]).float(), dim=-1)
            rows[name] = {
                **{k: round(v, 1) for k, v in speed[name].items()},
                "image_speedup_vs_fp32": round(speed[name]["images_per_s"] / speed["fp32"]["images_per_s"], 3),
                "text_speedup_vs_fp32": round(speed[name]["captions_per_s"] / speed["fp32"]["captions_per_s"], 3),
                "max_cosine_error": round(float(torch.max(torch.cat([1 - (i * ref_i).sum(-1), 1 - (t * ref_t).sum(-1)]))), 5),
            }
    print(json.dumps({"model": args.model, "batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
