"""Tests for finetune.config.schema: one-pass error reporting, overrides, cross-field rules, round-trips."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import yaml

from finetune.config.load import load_config, parse_override, save_config
from finetune.config.schema import (
    DatasetSpec,
    LoraTowerConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RecipeConfig,
    TrainConfig,
    looks_like_local_path,
)
from finetune.errors import ConfigError

HUB_MODEL = "openai/clip-vit-base-patch16"

# The smallest valid recipe: a hub model id (not checked on disk), synthetic data, a step budget.
MINIMAL = {
    "model": {"name_or_path": HUB_MODEL},
    "data": {
        "train": {"synthetic": {"domain": "target", "num_images": 8}},
        "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8, "seed": 1}}},
    },
    "train": {"max_steps": 10},
}


def write_recipe(directory: Path, tree, name: str = "recipe.yaml") -> Path:
    path = directory / name
    path.write_text(tree if isinstance(tree, str) else yaml.safe_dump(tree, sort_keys=False))
    return path


def recipe(**sections) -> dict:
    """MINIMAL with whole sections replaced (None deletes a section)."""
    tree = copy.deepcopy(MINIMAL)
    for key, value in sections.items():
        if value is None:
            tree.pop(key, None)
        else:
            tree[key] = value
    return tree


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    """Run from an empty folder so relative paths like ./nope really do not exist."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def load_problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.problems


# --------------------------------------------------------------------------------------------------
# (a) every problem at once, each with its dotted path


def test_minimal_recipe_is_valid_and_takes_defaults(in_tmp):
    cfg = load_config(write_recipe(in_tmp, MINIMAL))
    assert isinstance(cfg, RecipeConfig)
    assert cfg.model.name_or_path == HUB_MODEL
    assert cfg.train.max_steps == 10 and cfg.train.epochs is None
    assert cfg.lora.vision.rank == 8 and cfg.lora.text.alpha == 16.0
    assert cfg.lora.vision.target_modules == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert cfg.optim.lr == 1e-4 and cfg.optim.betas == (0.9, 0.98)
    assert cfg.data.train.synthetic.num_images == 8 and cfg.data.train.path is None
    assert cfg.eval.ks == [1, 5, 10]


def test_all_problems_reported_at_once_with_dotted_paths(in_tmp):
    tree = recipe(model={"name_or_path": "./nope"}, lora={"vision": {"rnak": 4}}, optim={"lr": "fast"})
    path = write_recipe(in_tmp, tree)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    err = info.value
    assert len(err.problems) == 3
    assert "model.name_or_path: path does not exist: ./nope" in err.problems
    assert "lora.vision.rnak: unknown key; did you mean 'lora.vision.rank'?" in err.problems
    (lr_problem,) = [p for p in err.problems if p.startswith("optim.lr: ")]
    assert "valid number" in lr_problem and lr_problem.endswith("got 'fast'")
    message = str(err)
    assert message.startswith(f"Invalid recipe {path} (3 problems):")
    for problem in err.problems:
        assert f"\n  {problem}" in message


def test_single_problem_header_is_singular(in_tmp):
    problems_path = write_recipe(in_tmp, recipe(optim={"lr": -1}))
    with pytest.raises(ConfigError, match=r"\(1 problem\):\n  optim\.lr: Input should be greater than 0, got -1$"):
        load_config(problems_path)


def test_unknown_key_without_close_match_lists_valid_keys(in_tmp):
    problems = load_problems(write_recipe(in_tmp, recipe(loss={"zzzzzz": 1})))
    assert problems == [f"loss.zzzzzz: unknown key; valid keys here: {', '.join(LossConfig.model_fields)}"]
    assert "terms, gather_across_processes" in problems[0]


def test_missing_required_sections_are_named(in_tmp):
    problems = load_problems(write_recipe(in_tmp, {"train": {"max_steps": 1}}))
    assert problems == ["model: required key is missing", "data: required key is missing"]
    assert all("<root>" not in p for p in problems)


# --------------------------------------------------------------------------------------------------
# (b) / (c) overrides


def test_override_with_unknown_key_is_reported_like_a_recipe_typo(in_tmp):
    problems = load_problems(write_recipe(in_tmp, MINIMAL), ["lora.text.rnak=3"])
    assert problems == ["lora.text.rnak: unknown key; did you mean 'lora.text.rank'?"]


def test_override_creating_an_unknown_section_is_reported(in_tmp):
    problems = load_problems(write_recipe(in_tmp, MINIMAL), ["train.foo.bar=3"])
    assert len(problems) == 1
    assert problems[0].startswith("train.foo: unknown key; valid keys here: output_dir, seed, batch_size")


def test_overrides_parse_yaml_values_and_reach_nested_keys(in_tmp):
    cfg = load_config(
        write_recipe(in_tmp, MINIMAL),
        [
            "lora.vision.rank=4",
            "optim.lr=1e-4",
            "optim.weight_decay=0.05",
            "optim.max_grad_norm=null",
            "lora.text.layers=[0, -1]",
            "lora.vision.target_modules=[q_proj, mlp.fc1]",
            "data.train.synthetic.num_images=16",
            "train.output_dir=runs/a=b",  # only the first '=' splits
        ],
    )
    assert cfg.lora.vision.rank == 4 and type(cfg.lora.vision.rank) is int
    assert cfg.optim.lr == pytest.approx(1e-4) and type(cfg.optim.lr) is float
    assert cfg.optim.weight_decay == 0.05 and type(cfg.optim.weight_decay) is float
    assert cfg.optim.max_grad_norm is None  # the default is 1.0: null really reached it
    assert cfg.lora.text.layers == [0, -1]
    assert cfg.lora.vision.target_modules == ["q_proj", "mlp.fc1"]
    assert cfg.data.train.synthetic.num_images == 16
    assert cfg.data.eval.target.synthetic.num_images == 8  # siblings untouched
    assert cfg.train.output_dir == "runs/a=b"
    assert cfg.train.max_steps == 10  # the recipe's own keys survive a sibling override


def test_override_replaces_a_recipe_value(in_tmp):
    cfg = load_config(write_recipe(in_tmp, recipe(train={"max_steps": 10, "batch_size": 32})), ["train.batch_size=8"])
    assert cfg.train.batch_size == 8 and cfg.train.max_steps == 10


def test_later_override_wins(in_tmp):
    cfg = load_config(write_recipe(in_tmp, MINIMAL), ["train.seed=1", "train.seed=2"])
    assert cfg.train.seed == 2


def test_override_can_switch_steps_to_epochs(in_tmp):
    cfg = load_config(write_recipe(in_tmp, MINIMAL), ["train.max_steps=null", "train.epochs=1.5"])
    assert cfg.train.max_steps is None and cfg.train.epochs == 1.5


def test_parse_override_values():
    assert parse_override("lora.vision.rank=8") == (["lora", "vision", "rank"], 8)
    assert parse_override("optim.lr=0.001") == (["optim", "lr"], 0.001)
    assert parse_override("optim.max_grad_norm=null") == (["optim", "max_grad_norm"], None)
    assert parse_override("optim.max_grad_norm=") == (["optim", "max_grad_norm"], None)
    assert parse_override("eval.ks=[1, 2]") == (["eval", "ks"], [1, 2])
    assert parse_override("eval.zero_shot=false") == (["eval", "zero_shot"], False)
    assert parse_override("model.revision=main") == (["model", "revision"], "main")


@pytest.mark.parametrize("bad", ["foo", "a..b=1", "=3", ".a=1", "a.=1"])
def test_malformed_override_raises(bad):
    with pytest.raises(ConfigError, match=r"overrides look like key\.sub=value") as info:
        parse_override(bad)
    assert info.value.problems == [f"{bad!r}: overrides look like key.sub=value"]


@pytest.mark.parametrize("bad", ["foo", "a..b=1"])
def test_malformed_override_raises_from_load_config(in_tmp, bad):
    path = write_recipe(in_tmp, MINIMAL)
    with pytest.raises(ConfigError, match=r"Invalid recipe overrides \(1 problem\)") as info:
        load_config(path, [bad])
    assert info.value.problems == [f"{bad!r}: overrides look like key.sub=value"]


# --------------------------------------------------------------------------------------------------
# (d) cross-field rules


def test_warmup_steps_and_ratio_together(in_tmp):
    problems = load_problems(write_recipe(in_tmp, recipe(optim={"warmup_steps": 3, "warmup_ratio": 0.1})))
    assert problems == ["optim: set optim.warmup_steps or optim.warmup_ratio, not both"]


@pytest.mark.parametrize("train", [{"max_steps": 3, "epochs": 1}, {}], ids=["both", "neither"])
def test_max_steps_xor_epochs(in_tmp, train):
    problems = load_problems(write_recipe(in_tmp, recipe(train=train)))
    assert problems == ["train: set exactly one of train.max_steps and train.epochs"]


@pytest.mark.parametrize(
    "spec",
    [
        {"path": "some-org/some-data", "synthetic": {"domain": "target", "num_images": 8}},
        {"split": "train"},
    ],
    ids=["both", "neither"],
)
def test_dataset_path_xor_synthetic(in_tmp, spec):
    tree = recipe()
    tree["data"]["train"] = spec
    problems = load_problems(write_recipe(in_tmp, tree))
    assert problems == ["data.train: set exactly one of `path` (a dataset to load) and `synthetic` (a generated one)"]


def test_eval_dataset_rule_uses_its_own_path(in_tmp):
    tree = recipe()
    tree["data"]["eval"]["source"] = {"split": "validation"}
    problems = load_problems(write_recipe(in_tmp, tree))
    assert problems == ["data.eval.source: set exactly one of `path` (a dataset to load) and `synthetic` (a generated one)"]


def test_both_towers_disabled(in_tmp):
    tree = recipe(lora={"vision": {"enabled": False}, "text": {"enabled": False}})
    problems = load_problems(write_recipe(in_tmp, tree))
    assert len(problems) == 1
    assert "lora.vision.enabled and lora.text.enabled are both false: nothing would be adapted" in problems[0]


def test_cross_field_and_field_errors_are_reported_together(in_tmp):
    tree = recipe(optim={"warmup_steps": 3, "warmup_ratio": 0.1}, train={"max_steps": -1})
    problems = load_problems(write_recipe(in_tmp, tree))
    assert "optim: set optim.warmup_steps or optim.warmup_ratio, not both" in problems
    assert "train.max_steps: Input should be greater than or equal to 0, got -1" in problems
    assert len(problems) == 2


# --------------------------------------------------------------------------------------------------
# (e) a disabled tower with settings warns


def test_disabled_tower_with_settings_warns_naming_ignored_keys(in_tmp):
    tree = recipe(lora={"vision": {"enabled": False, "rank": 4, "alpha": 8}})
    with pytest.warns(UserWarning, match=r"^lora\.vision\.enabled is false: lora\.vision\.alpha, lora\.vision\.rank ignored$"):
        cfg = load_config(write_recipe(in_tmp, tree))
    assert cfg.lora.vision.enabled is False and cfg.lora.text.enabled is True


def test_disabled_tower_without_settings_does_not_warn(in_tmp):
    path = write_recipe(in_tmp, recipe(lora={"text": {"enabled": False}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = load_config(path)
    assert cfg.lora.text.enabled is False


def test_gradient_accumulation_warns_about_negatives(in_tmp):
    path = write_recipe(in_tmp, recipe(train={"max_steps": 1, "batch_size": 16, "gradient_accumulation_steps": 4}))
    with pytest.warns(UserWarning, match=r"only train\.batch_size=16 x processes negatives"):
        load_config(path)


# --------------------------------------------------------------------------------------------------
# (f) save_config round-trip


def test_save_config_round_trips_with_defaults_spelled_out(in_tmp):
    tree = recipe(optim={"lr": 3e-4, "warmup_ratio": 0.05}, lora={"vision": {"rank": 4, "layers": [-2, -1]}})
    cfg = load_config(write_recipe(in_tmp, tree))
    out = in_tmp / "run" / "nested" / "config.yaml"
    save_config(cfg, out)

    assert not out.with_suffix(".yaml.tmp").exists()
    saved = yaml.safe_load(out.read_text())
    # Every default is written, not just what the recipe set.
    assert set(saved) == set(RecipeConfig.model_fields)  # every section, new ones included
    assert {"model", "lora", "data", "loss", "sampling", "optim", "train", "eval", "export", "distill", "mining", "augment"} <= set(saved)
    for section, schema in [("model", ModelConfig), ("loss", LossConfig), ("optim", OptimConfig), ("train", TrainConfig)]:
        assert set(saved[section]) == set(schema.model_fields), section
    assert set(saved["lora"]["text"]) == set(LoraTowerConfig.model_fields)
    assert set(saved["data"]["train"]) == set(DatasetSpec.model_fields)
    assert saved["loss"]["terms"] == [{"name": "infonce", "weight": 1.0}] and saved["loss"]["gather_across_processes"] is True
    assert saved["train"]["batch_size"] == 64 and saved["train"]["epochs"] is None
    assert saved["lora"]["text"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "out_proj"]
    assert saved["lora"]["vision"]["layers"] == [-2, -1]
    assert saved["optim"]["betas"] == [0.9, 0.98]
    assert saved["data"]["train"]["split"] == "train" and saved["data"]["train"]["path"] is None
    assert saved["data"]["train"]["synthetic"]["image_size"] == 32
    assert saved["model"]["trust_remote_code"] is False

    again = load_config(out)
    assert again.model_dump() == cfg.model_dump()
    assert again.optim.lr == 3e-4 and again.lora.vision.layers == [-2, -1]


def test_save_config_overwrites(in_tmp):
    out = in_tmp / "config.yaml"
    save_config(load_config(write_recipe(in_tmp, MINIMAL), ["train.seed=1"]), out)
    save_config(load_config(write_recipe(in_tmp, MINIMAL), ["train.seed=2"]), out)
    assert load_config(out).train.seed == 2


# --------------------------------------------------------------------------------------------------
# (g) hub ids vs local paths


@pytest.mark.parametrize("value", [HUB_MODEL, "openai/clip-vit-base-patch32", "bert-base-uncased"])
def test_hub_ids_are_not_local_paths(in_tmp, value):
    assert looks_like_local_path(value) is False
    cfg = load_config(write_recipe(in_tmp, recipe(model={"name_or_path": value})))
    assert cfg.model.name_or_path == value


@pytest.mark.parametrize("value", ["./x", "/abs/x", "a/b/c", "../x", "~/definitely-not-here-xyz"])
def test_local_looking_paths_must_exist(in_tmp, value):
    assert looks_like_local_path(value) is True
    problems = load_problems(write_recipe(in_tmp, recipe(model={"name_or_path": value})))
    assert problems == [f"model.name_or_path: path does not exist: {value}"]


def test_existing_local_paths_validate(in_tmp):
    (in_tmp / "a" / "b" / "c").mkdir(parents=True)
    (in_tmp / "single").mkdir()
    assert looks_like_local_path("single") is True  # exists: a local folder, not a hub id
    cfg = load_config(
        write_recipe(in_tmp, recipe(model={"name_or_path": "a/b/c"})), ["data.train.path=./single", "data.train.synthetic=null"]
    )
    assert cfg.model.name_or_path == "a/b/c"
    assert cfg.data.train.path == "./single" and cfg.data.train.synthetic is None


def test_missing_local_dataset_path_is_reported(in_tmp):
    tree = recipe()
    tree["data"]["eval"]["target"] = {"path": "./no-such-data"}
    problems = load_problems(write_recipe(in_tmp, tree))
    assert problems == ["data.eval.target.path: path does not exist: ./no-such-data"]


# --------------------------------------------------------------------------------------------------
# (h) the recipe file itself


def test_missing_recipe_file(in_tmp):
    missing = in_tmp / "nope.yaml"
    with pytest.raises(ConfigError, match=r"recipe file not found: .*nope\.yaml") as info:
        load_config(missing)
    assert info.value.problems == [f"recipe file not found: {missing}"]


def test_recipe_path_is_a_directory(in_tmp):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(in_tmp)


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_recipe_not_a_mapping(in_tmp, text):
    with pytest.raises(ConfigError) as info:
        load_config(write_recipe(in_tmp, text))
    assert info.value.problems == ["the top level must be a mapping of sections (model, lora, data, ...)"]


def test_recipe_invalid_yaml(in_tmp):
    path = write_recipe(in_tmp, "model:\n  name_or_path: [unclosed\n")
    with pytest.raises(ConfigError, match=r"Invalid recipe .*\(1 problem\):\n  not valid YAML: ") as info:
        load_config(path)
    assert len(info.value.problems) == 1


def test_empty_recipe_reports_every_missing_piece(in_tmp):
    problems = load_problems(write_recipe(in_tmp, ""))
    assert problems == [
        "model: required key is missing",
        "data: required key is missing",
        "train: set exactly one of train.max_steps and train.epochs",
    ]


def test_missing_train_section_does_not_hide_other_problems(in_tmp):
    # Regression: the invalid default TrainConfig() used to abort validation with a single
    # "<root>: ..." problem, hiding every other mistake in the recipe.
    tree = recipe(train=None, model={"name_or_path": "./nope"}, lora={"vision": {"rnak": 4}})
    problems = load_problems(write_recipe(in_tmp, tree))
    assert problems == [
        "model.name_or_path: path does not exist: ./nope",
        "lora.vision.rnak: unknown key; did you mean 'lora.vision.rank'?",
        "train: set exactly one of train.max_steps and train.epochs",
    ]


def test_train_section_can_be_supplied_by_overrides_alone(in_tmp):
    cfg = load_config(write_recipe(in_tmp, recipe(train=None)), ["train.epochs=2"])
    assert cfg.train.epochs == 2.0 and cfg.train.batch_size == 64 and cfg.train.output_dir == "runs/default"
