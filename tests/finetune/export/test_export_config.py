"""The recipe's export: section: defaults, and errors that name the key."""

from __future__ import annotations

import pytest

from finetune.config.load import validate_config
from finetune.errors import ConfigError

BASE = {
    "model": {"name_or_path": "openai/clip-vit-base-patch16"},
    "data": {
        "train": {"synthetic": {"domain": "target", "num_images": 8}},
        "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8}}},
    },
    "train": {"max_steps": 1},
}


def test_export_defaults():
    ex = validate_config(BASE).export
    assert (ex.alpha, ex.alpha_sweep, ex.min_source_retention, ex.max_r1_drop) == (1.0, [0.0, 0.25, 0.5, 0.75, 1.0], 0.95, 0.5)
    assert (ex.select_direction, ex.select_metric, ex.if_no_alpha_qualifies) == ("t2i", "R@1", "error")


@pytest.mark.parametrize(
    "export,message",
    [
        ({"alpha_sweep": [0.5, 1.0]}, "export.alpha_sweep: needs 0 (the base, the retention reference)"),
        ({"select_metric": "R@3"}, "export.select_metric: R@3 is not measured; eval.ks is [1, 5, 10]"),
        ({"select_metric": "mean_rank"}, "export.select_metric: must be a recall like R@1"),
        ({"max_r1_drop": -1}, "export.max_r1_drop: Input should be greater than or equal to 0"),
        ({"min_source_retention": 1.5}, "export.min_source_retention: Input should be less than or equal to 1"),
        ({"alpah": 0.5}, "export.alpah: unknown key; did you mean 'export.alpha'?"),
    ],
)
def test_export_errors_name_the_key(export, message):
    with pytest.raises(ConfigError) as err:
        validate_config({**BASE, "export": export})
    assert message in str(err.value)


def test_the_gate_reads_retrieval_rows_of_a_labelled_set_and_ignores_class_rows():
    from finetune.errors import QualityGateError
    from finetune.export.quantize import quality_gate, r1_drops

    def results(t2i, i2t):
        return {
            "target": {
                "t2i": {"R@1": t2i, "R@5": 90.0},
                "i2t": {"R@1": i2t},
                "classification": {"top1": 50.0},
                "per_class": {"circle": {"t2i_R@1": 1.0}},
            }
        }

    assert r1_drops(results(50.0, 40.0), results(49.75, 40.5)) == {"t2i": 0.25, "i2t": -0.5}
    quality_gate(results(50.0, 40.0), results(49.75, 40.5), dtype="int8", max_r1_drop=0.5)  # passes
    with pytest.raises(QualityGateError, match=r"t2i R@1 50.00 -> 49.00 \(-1.00\)"):
        quality_gate(results(50.0, 40.0), results(49.0, 40.0), dtype="int8", max_r1_drop=0.5)


def test_a_per_language_run_exports_against_its_first_language_set(capsys):
    """A swapped-text-tower run has data.eval.languages and no target: export reads the first language."""
    from finetune.config.load import load_config
    from finetune.export.exporter import load_eval_sets

    small = [f"data.eval.languages.{code}.synthetic.num_images=3" for code in ("en", "de", "es", "zh")]
    cfg = load_config("recipes/multilingual_demo.yaml", small)
    assert cfg.data.eval.target is None
    sets = load_eval_sets(cfg)
    assert list(sets) == ["target"] and sets["target"].num_images == 3
    assert sets["target"].captions[0].isascii()  # the English set, the first listed
    assert "export evaluates data.eval.languages.en as its target" in capsys.readouterr().out
