"""The tiny CLIP's tokenizer cannot drop text: every byte symbol is in it bare and word-final."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPModel, CLIPTokenizer, CLIPTokenizerFast

from finetune.models.tiny_clip import (
    BYTE_SYMBOLS,
    END_OF_WORD,
    FIXED_VOCAB_SIZE,
    SPECIAL_TOKENS,
    build_tiny_clip,
    train_clip_tokenizer,
)

FEW_WORDS = ["a small red circle", "the large blue square", "small red circles"] * 5

# CLIP's pre-tokenizer lowercases, makes every digit its own word and splits punctuation from
# letters; decoding joins words with spaces. These are the texts as CLIP gives them back.
ROUND_TRIPS = {
    "six small circles": "six small circles",
    "A large red circle 42": "a large red circle 4 2",
    "naïve café, déjà vu!": "naïve café , déjà vu !",
    "zebra_quux x-ray 3.5mm": "zebra _ quux x - ray 3 . 5 mm",
    "Привет мир": "привет мир",
    "日本語のテキスト": "日本語のテキスト",
    "emoji 🙂 ok": "emoji 🙂 ok",
}


@pytest.fixture(scope="module")
def saved_tokenizer_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokenizer")
    train_clip_tokenizer(FEW_WORDS, vocab_size=20).save_pretrained(out)
    return out


def test_vocabulary_holds_every_byte_bare_and_word_final():
    vocab = train_clip_tokenizer(FEW_WORDS, vocab_size=20).get_vocab()
    assert len(BYTE_SYMBOLS) == 256 and FIXED_VOCAB_SIZE == 514
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, 1]
    assert all(symbol in vocab for symbol in BYTE_SYMBOLS)
    assert all(symbol + END_OF_WORD in vocab for symbol in BYTE_SYMBOLS)


def test_vocab_size_counts_the_learned_tokens_only():
    assert len(train_clip_tokenizer(FEW_WORDS, vocab_size=0)) == FIXED_VOCAB_SIZE
    assert len(train_clip_tokenizer(FEW_WORDS, vocab_size=7)) == FIXED_VOCAB_SIZE + 7
    # "small" (4 merges to one token) and "red" (2): six pairs to merge, then the trainer stops.
    tokenizer = train_clip_tokenizer(["small small small", "red red"], vocab_size=50)
    assert len(tokenizer) == FIXED_VOCAB_SIZE + 6
    assert tokenizer.tokenize("small red") == ["small</w>", "red</w>"]


def test_negative_vocab_size_is_refused():
    with pytest.raises(ValueError, match="vocab_size counts learned BPE tokens"):
        train_clip_tokenizer(FEW_WORDS, vocab_size=-1)


@pytest.mark.parametrize("tokenizer_class", [CLIPTokenizer, CLIPTokenizerFast])
@pytest.mark.parametrize("text", list(ROUND_TRIPS))
def test_any_text_round_trips_with_end_of_text_only_at_the_end(saved_tokenizer_dir, tokenizer_class, text):
    tokenizer = tokenizer_class.from_pretrained(saved_tokenizer_dir)
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    # unk == eos == pad in CLIP, and the text tower pools at the first eos: none may come early.
    assert tokenizer.eos_token_id not in ids[1:-1]
    assert tokenizer.unk_token_id not in ids[1:-1]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ROUND_TRIPS[text]


@pytest.mark.parametrize("tokenizer_class", [CLIPTokenizer, CLIPTokenizerFast])
def test_an_unseen_word_falls_back_to_byte_symbols(saved_tokenizer_dir, tokenizer_class):
    tokenizer = tokenizer_class.from_pretrained(saved_tokenizer_dir)
    assert tokenizer.tokenize("six") == ["s", "i", "x</w>"]
    assert tokenizer.decode(tokenizer("six")["input_ids"], skip_special_tokens=True) == "six"


def test_text_after_an_unseen_ending_reaches_the_text_features():
    """Captions that differ only after a word-final symbol never seen in training embed differently."""
    torch.manual_seed(0)
    model, processor = build_tiny_clip(FEW_WORDS, vocab_size=20, width=32, layers=1)
    model.eval()
    tokens = processor.tokenizer(["six small circles", "six large circles"], padding=True, return_tensors="pt")
    with torch.no_grad():
        features = model.get_text_features(**tokens).pooler_output  # (2, D)
    assert isinstance(model, CLIPModel) and model.config.text_config.vocab_size == len(processor.tokenizer)
    assert features.shape == (2, 32)
    assert (features[0] - features[1]).abs().max() > 1e-4
