"""scripts/ablate_negatives.py: every variant is a valid demo recipe, and the table reads results right."""

from __future__ import annotations

import json

import pytest

from finetune.config.load import load_config
from scripts import ablate_negatives as ablation


@pytest.mark.parametrize("name", list(ablation.VARIANTS))
def test_every_variant_is_a_valid_demo_recipe_that_changes_what_it_names(name):
    cfg = load_config("recipes/demo.yaml", ablation.VARIANTS[name])
    base = load_config("recipes/demo.yaml", [])
    assert cfg.train.seed == base.train.seed and cfg.data == base.data and cfg.optim == base.optim
    expected_terms = {"mined": ["infonce"], "mined_refresh": ["infonce"], "augment": ["infonce"], "augment_text": ["infonce"]}
    names = [t.name for t in cfg.loss.terms]
    assert names == expected_terms.get(name, name.split("+"))
    assert cfg.mining.enabled == name.startswith("mined")
    assert cfg.augment.image_enabled() == (name == "augment") and cfg.augment.text_enabled() == (name == "augment_text")


def test_table_rows_read_recall_retention_and_wall_time(tmp_path, capsys, monkeypatch):
    def result(t2i, source):
        sets = {
            "target": {"t2i": {"R@1": t2i, "R@5": t2i + 10}, "i2t": {"R@1": t2i - 2, "R@5": t2i + 8}},
            "source": {"t2i": {"R@1": source}},
        }
        zero = {"target": {"t2i": {"R@1": 0.0, "R@5": 1.0}, "i2t": {"R@1": 0.5, "R@5": 2.0}}, "source": {"t2i": {"R@1": 80.0}}}
        return {"zero_shot": zero, "adapted": sets}

    for name, (t2i, source, wall) in {"infonce": (50.0, 72.0, 60.0), "siglip": (40.0, 76.0, 65.5)}.items():
        folder = tmp_path / name
        (folder / "eval").mkdir(parents=True)
        (folder / "eval" / "results.json").write_text(json.dumps(result(t2i, source)))
        (folder / "ablation_wall_time.json").write_text(json.dumps({"wall_time_s": wall}))
    monkeypatch.setattr(ablation.subprocess, "run", lambda *a, **k: pytest.fail("finished variants are read back, not re-run"))
    assert ablation.main(["--out", str(tmp_path), "--variants", "infonce", "siglip"]) == 0
    rows = json.loads((tmp_path / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["zero-shot", "in-batch InfoNCE", "SigLIP"]
    assert rows[1]["t2i R@5"] == 60.0 and rows[1]["i2t R@1"] == 48.0
    assert rows[2]["source retention %"] == pytest.approx(95.0) and rows[2]["wall s"] == 65.5
    printed = capsys.readouterr().out
    assert "| SigLIP | 40.00 | 50.00 | 38.00 | 48.00 | 76.00 | 95.0 | 65.5 |" in printed
    assert (tmp_path / "ablation.png").stat().st_size > 0
