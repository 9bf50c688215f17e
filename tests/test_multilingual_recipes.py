"""The multilingual recipes name what they claim: CLIP ViT-B/32 + XLM-R, M-CLIP's translations, XM3600 per
language (real); the offline demo generates everything and evaluates the same renders in every language."""

from __future__ import annotations

from pathlib import Path

from finetune.config.load import load_config
from finetune.models.towers import BERT_ATTENTION

ROOT = Path(__file__).resolve().parents[1]


def test_real_multilingual_recipe_names_its_models_and_datasets(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "recipes" / "multilingual.yaml")
    assert (cfg.model.name_or_path, cfg.model.text_tower) == ("openai/clip-vit-base-patch32", "xlm-roberta-base")
    assert cfg.distill.data.path == "M-CLIP/ImageCaptions-7M-Translations"
    assert not cfg.lora.vision.enabled and tuple(cfg.lora.text.target_modules) == BERT_ATTENTION
    assert set(cfg.data.eval.languages) == {"en", "de", "es", "zh"}
    for code, spec in cfg.data.eval.languages.items():
        assert spec.path == "floschne/xm3600" and spec.split == f"{code}[50%:]"  # one split per language
    # Stage 2 trains on the other half of the images.
    assert cfg.data.train.path == "floschne/xm3600" and cfg.data.train.split.endswith("[:50%]")


def test_multilingual_demo_is_offline_and_evaluates_the_same_renders_per_language(monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "recipes" / "multilingual_demo.yaml")
    assert Path(cfg.model.text_tower).is_dir() and cfg.distill.data.synthetic is not None
    specs = cfg.data.eval.languages
    assert set(specs) == {"en", "de", "es", "zh"}
    assert {(s.synthetic.domain, s.synthetic.seed, s.synthetic.num_images) for s in specs.values()} == {("source", 1, 300)}
    assert {code: s.synthetic.languages for code, s in specs.items()} == {c: [c] for c in specs}
    assert cfg.data.train.synthetic.seed != 1  # unseen renders
