"""Build the multilingual demo's text encoder: a tiny XLM-R and an XLM-R-format tokenizer, offline.

    python scripts/build_multilingual_base.py --out recipes/assets/demo-xlmr

The tokenizer is a Unigram (SentencePiece-style) vocabulary learned on the demo's source-domain captions
in English, German, Spanish and Chinese; the model is an `XLMRobertaModel` built from a small config with
seeded random weights. Together they stand in for `xlm-roberta-base` in recipes/multilingual_demo.yaml:
`AutoTokenizer` / `AutoModel.from_pretrained` load the folder exactly like the hub checkpoint. Unlike the
real XLM-R it knows no language yet; stage 1 of the recipe (distillation) is what teaches it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from transformers import XLMRobertaConfig, XLMRobertaModel

from data_tools.synthetic.multilingual import all_multilingual_caption_text
from data_tools.synthetic.tokenizer import train_xlmr_tokenizer


def build_tiny_xlmr(vocab_size: int, width: int, layers: int, max_length: int, seed: int, dropout: float = 0.1):
    """(XLMRobertaModel, XLMRobertaTokenizer) fitted to the synthetic multilingual captions.

    `dropout` is XLM-R's hidden and attention dropout (0.1 in xlm-roberta-base).
    """
    tokenizer = train_xlmr_tokenizer(all_multilingual_caption_text(), vocab_size, max_length)
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=width,
        intermediate_size=width * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, width // 16),
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        # RoBERTa positions start after the padding index: max_length usable positions need two more.
        max_position_embeddings=max_length + tokenizer.pad_token_id + 1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return XLMRobertaModel(config), tokenizer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="recipes/assets/demo-xlmr")
    parser.add_argument("--vocab-size", type=int, default=1000, help="Unigram pieces, special tokens included (the trainer may stop short)")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=40, help="longest caption in tokens")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model, tokenizer = build_tiny_xlmr(args.vocab_size, args.width, args.layers, args.max_length, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    print(json.dumps({"out": str(out), "vocab": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
