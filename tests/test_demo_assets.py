"""The shipped demo base model is a standard Hugging Face CLIP folder, small, and good at its source domain."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import pre_tokenizers
from transformers import (
    AutoProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPTokenizerFast,
)

from data_tools.loading import RetrievalSet, load_image_text_dataset
from finetune.evaluation.evaluate import evaluate_retrieval

DEMO = Path(__file__).resolve().parents[1] / "recipes" / "assets" / "demo-clip"


def test_demo_folder_is_small_and_standard():
    names = {p.name for p in DEMO.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"} <= names
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 10 * 1024 * 1024


def test_demo_folder_loads_with_the_real_classes():
    model = CLIPModel.from_pretrained(DEMO)
    processor = CLIPProcessor.from_pretrained(DEMO)
    assert isinstance(AutoProcessor.from_pretrained(DEMO), CLIPProcessor)
    # Domain captions, then digits, unseen words and non-ASCII text, as CLIP decodes them (digits and
    # punctuation are words of their own).
    texts = {
        "a large red circle in the top left": "a large red circle in the top left",
        "finding: wedge amber small lesion, lower right": "finding : wedge amber small lesion , lower right",
        "six small circles": "six small circles",
        "a large red circle 42": "a large red circle 4 2",
        "Zebra crossing at 3pm, café Ωmega!": "zebra crossing at 3 pm , café ωmega !",
    }
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        tok = cls.from_pretrained(DEMO)
        for text, decoded in texts.items():
            ids = tok(text)["input_ids"]
            assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
            # unk == eos in CLIP and the text tower pools at the first eos: an early one cuts the caption.
            assert tok.eos_token_id not in ids[1:-1], (text, tok.convert_ids_to_tokens(ids))
            assert tok.unk_token_id not in ids[1:-1], (text, tok.convert_ids_to_tokens(ids))
            assert tok.decode(ids, skip_special_tokens=True) == decoded
    pixels = processor.image_processor(images=[torch.zeros(3, 40, 50).numpy().transpose(1, 2, 0)], return_tensors="pt")
    assert pixels["pixel_values"].shape == (1, 3, model.config.vision_config.image_size, model.config.vision_config.image_size)


def test_demo_vocabulary_holds_every_byte_bare_and_word_final():
    vocab = CLIPTokenizer.from_pretrained(DEMO).get_vocab()
    symbols = pre_tokenizers.ByteLevel.alphabet()
    assert len(symbols) == 256
    assert [s for s in symbols if s not in vocab or s + "</w>" not in vocab] == []
    assert CLIPModel.from_pretrained(DEMO).config.text_config.vocab_size == len(vocab)


def test_demo_base_knows_the_source_and_not_the_target():
    """What makes the demo meaningful: strong zero-shot on the source, poor on the shifted target."""
    model = CLIPModel.from_pretrained(DEMO)
    processor = CLIPProcessor.from_pretrained(DEMO)
    sets = {
        domain: RetrievalSet.from_pairs(
            load_image_text_dataset(key=f"data.eval.{domain}", synthetic=dict(domain=domain, num_images=100, seed=7))
        )
        for domain in ("source", "target")
    }
    results, _ = evaluate_retrieval(model, processor, sets, batch_size=100, max_text_length=32)
    assert results["source"]["t2i"]["R@5"] > 80.0
    assert results["target"]["t2i"]["R@5"] < 20.0


def test_the_demo_base_can_be_rebuilt(tmp_path, capsys):
    """scripts/pretrain_base.py end to end on a few images and steps: a loadable folder, a finite, falling loss."""
    import json

    from scripts.pretrain_base import main as pretrain

    out = tmp_path / "base"
    args = [
        "--out",
        str(out),
        "--images",
        "24",
        "--steps",
        "6",
        "--batch-size",
        "8",
        "--width",
        "32",
        "--layers",
        "1",
        "--vocab-size",
        "20",
    ]
    assert pretrain(args) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["out"] == str(out) and 0 < summary["final_loss"] < 10
    model = CLIPModel.from_pretrained(out)
    assert model.config.text_config.hidden_size == 32 and model.config.text_config.num_hidden_layers == 1
    assert CLIPProcessor.from_pretrained(out).tokenizer("six small circles")["input_ids"][1:-1].count(1) == 0
