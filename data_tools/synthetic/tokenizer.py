"""A small XLM-R-format tokenizer for the offline multilingual demo (scripts/build_multilingual_base.py).

train_xlmr_tokenizer(all_multilingual_caption_text(), vocab_size=400, max_length=40)  # texts: data_tools.synthetic.multilingual
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

XLMR_SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # ids 0..4, as in xlm-roberta-base


def train_xlmr_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A SentencePiece-style Unigram tokenizer learned on `texts`, in XLM-R's format.

    Same pieces as XLM-R's own tokenizer: `▁` word starts (Metaspace), `<s> ... </s>` around a caption,
    special tokens at XLM-R's ids. Returned as `transformers.XLMRobertaTokenizer`, so `save_pretrained`
    writes a folder `AutoTokenizer.from_pretrained` loads as XLM-R's tokenizer. `vocab_size` includes the
    five special tokens; a character never seen in `texts` becomes `<unk>`.
    """
    from transformers import XLMRobertaTokenizer

    backend = Tokenizer(models.Unigram())
    # XLM-R's pre-tokenizer (see transformers' XLMRobertaTokenizer): whitespace split, then `▁` word starts.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size,
        special_tokens=XLMR_SPECIAL_TOKENS,
        unk_token="<unk>",
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer)
    vocab = [(piece, float(score)) for piece, score in json.loads(backend.to_str())["model"]["vocab"]]
    if [piece for piece, _ in vocab[:5]] != XLMR_SPECIAL_TOKENS:
        raise RuntimeError(f"special tokens must hold ids 0..4 as in XLM-R, got {vocab[:5]}")
    return XLMRobertaTokenizer(vocab=vocab, model_max_length=max_length)
