"""`loss.terms` in the recipe schema: per-term fields validated per name with dotted paths, "did you
mean" for unknown terms and keys, duplicates, weights, the old `loss.kind`, cross-field warnings."""

from __future__ import annotations

import copy
import warnings

import pytest

from finetune.config.load import validate_config
from finetune.config.schema import InfoNCETerm, SigLIPTerm
from finetune.errors import ConfigError

MINIMAL = {
    "model": {"name_or_path": "openai/clip-vit-base-patch16"},
    "data": {
        "train": {"synthetic": {"domain": "target", "num_images": 8}, "label_column": None},
        "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8, "seed": 1}}},
    },
    "train": {"max_steps": 10},
}


def with_loss(**loss) -> dict:
    tree = copy.deepcopy(MINIMAL)
    tree["loss"] = loss
    return tree


def problems(tree) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(tree)
    return info.value.problems


def test_default_is_one_infonce_term_of_weight_1():
    cfg = validate_config(copy.deepcopy(MINIMAL))
    assert cfg.loss.terms == [InfoNCETerm(name="infonce", weight=1.0)]
    assert cfg.loss.model_dump(mode="json")["terms"] == [{"name": "infonce", "weight": 1.0}]


def test_terms_take_per_name_fields_and_defaults():
    cfg = validate_config(
        with_loss(
            terms=[
                {"name": "infonce", "weight": 1.0},
                {"name": "siglip", "weight": 0.5},
                {"name": "vsepp", "margin": 0.1},
                "hn_infonce",  # a bare name takes the term's defaults
            ]
        )
    )
    names = [t.name for t in cfg.loss.terms]
    assert names == ["infonce", "siglip", "vsepp", "hn_infonce"]
    assert cfg.loss.terms[1] == SigLIPTerm(name="siglip", weight=0.5, temperature_init=10.0, bias_init=-10.0)
    assert cfg.loss.terms[2].margin == 0.1 and cfg.loss.terms[3].beta == 0.5


def test_unknown_term_name_suggests_the_closest():
    assert problems(with_loss(terms=["infonce", {"name": "sigilp"}])) == [
        "loss.terms.1.name: unknown term 'sigilp'; did you mean 'siglip'? "
        "(terms: infonce, hn_infonce, siglip, vsepp, semihard, margin_ranking, adversarial)"
    ]


def test_a_field_of_another_term_is_an_error_with_the_dotted_path():
    got = problems(with_loss(terms=["infonce", {"name": "siglip", "beta": 1.0}, {"name": "hn_infonce", "bta": 1.0}]))
    assert got == [
        "loss.terms.1.beta: unknown key; valid keys here: name, weight, temperature_init, bias_init",
        "loss.terms.2.bta: unknown key; did you mean 'loss.terms.2.beta'?",
    ]


def test_negative_margin_zero_weight_and_missing_name_are_reported_together():
    got = problems(with_loss(terms=[{"name": "vsepp", "margin": -0.1}, {"name": "infonce", "weight": 0}, {"weight": 1.0}]))
    assert got == [
        "loss.terms.0.margin: Input should be greater than or equal to 0, got -0.1",
        "loss.terms.1.weight: Input should be greater than 0, got 0",
        "loss.terms.2.name: required key is missing (one of infonce, hn_infonce, siglip, vsepp, semihard, margin_ranking, adversarial)",
    ]


def test_duplicate_terms_and_adversarial_alone_are_errors():
    assert problems(with_loss(terms=["infonce", "vsepp", {"name": "infonce", "weight": 2.0}])) == [
        "loss.terms.2.name: infonce is already loss.terms.0; use one term with the summed weight"
    ]
    assert "adversarial alone never pulls an image towards its caption" in problems(with_loss(terms=["adversarial"]))[0]
    assert problems(with_loss(terms=[]))[0].startswith("loss.terms: List should have at least 1 item")


def test_old_loss_kind_infonce_still_loads_and_anything_else_says_how_to_migrate():
    cfg = validate_config(with_loss(kind="infonce"))
    assert [t.name for t in cfg.loss.terms] == ["infonce"]
    assert problems(with_loss(kind="siglip")) == [
        "loss.kind was replaced by loss.terms (got kind='siglip'): write loss.terms: [{name: infonce, weight: 1.0}, ...]"
    ]


def test_class_weights_with_a_term_that_ignores_them_warns_naming_both_keys():
    tree = with_loss(terms=["infonce", "siglip", "vsepp"], class_weights="inverse_frequency")
    tree["data"]["train"]["label_column"] = "label"
    with pytest.warns(UserWarning) as record:
        validate_config(tree)
    messages = [str(w.message) for w in record]
    assert any(
        "loss.class_weights=inverse_frequency: loss.terms.1 (siglip), loss.terms.2 (vsepp) ignore class weights" in m for m in messages
    ), messages
    tree["loss"]["terms"] = ["infonce", "hn_infonce"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_config(tree)


def test_trained_logit_scale_without_a_term_that_reads_it_warns():
    tree = with_loss(terms=["siglip", "vsepp"])
    tree["model"]["train_logit_scale"] = True
    with pytest.warns(UserWarning, match="model.train_logit_scale is true but no term in loss.terms reads CLIP's temperature"):
        validate_config(tree)


def test_terms_override_on_the_command_line(tmp_path):
    import yaml

    from finetune.config.load import load_config

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    cfg = load_config(path, ["loss.terms=[infonce, {name: siglip, weight: 0.5}]"])
    assert [(t.name, t.weight) for t in cfg.loss.terms] == [("infonce", 1.0), ("siglip", 0.5)]
