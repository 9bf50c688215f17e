"""Recipe -> datasets: the one place that says which datasets a recipe names and how each becomes the
loader's plain arguments. Training, `data inspect`, `mine`, `export`, `index` and `push` all call it, so
they agree on the sets, their keys and the template seed.

    dataset_specs(cfg)   {"data.train": spec, "data.eval.target": spec, ..., "data.replay.0": spec, "data.eval.languages.de": spec}
    eval_specs(cfg)      {"target": spec, "source": spec, "de": spec}: the names results.json uses
    dataset_arguments(spec, seed)   -> load_image_text_dataset(**arguments)
"""

from __future__ import annotations

from finetune.config.schema import DatasetSpec, RecipeConfig
from finetune.errors import ConfigError
from finetune.models.load import load_model_config
from finetune.models.text_swap import text_swap_config
from finetune.models.towers import model_layout

EVAL_PREFIX = "data.eval."


def dataset_specs(cfg: RecipeConfig, *, replay: bool = True) -> dict[str, DatasetSpec]:
    """Every dataset the recipe names, keyed by its dotted recipe key; sections left unset are absent."""
    specs: dict[str, DatasetSpec] = {"data.train": cfg.data.train}
    if cfg.data.eval.target is not None:
        specs["data.eval.target"] = cfg.data.eval.target
    if cfg.data.eval.source is not None:
        specs["data.eval.source"] = cfg.data.eval.source
    if replay:
        for i, spec in enumerate(cfg.data.replay):
            specs[f"data.replay.{i}"] = spec
    for code, spec in (cfg.data.eval.languages or {}).items():  # eval sets named by ISO code
        specs[f"data.eval.languages.{code}"] = spec
    return specs


def eval_set_name(key: str) -> str:
    """`data.eval.target` -> `target`, `data.eval.languages.de` -> `de`: the names results rows use."""
    return key.rsplit(".", 1)[1]


def eval_specs(cfg: RecipeConfig) -> dict[str, DatasetSpec]:
    """The eval sets by the names results.json uses: target, source, and one per language code."""
    return {eval_set_name(key): spec for key, spec in dataset_specs(cfg, replay=False).items() if key.startswith(EVAL_PREFIX)}


def dataset_arguments(spec: DatasetSpec, seed: int) -> dict:
    """The dataset spec as the loader's plain arguments, field by field. `seed` draws a label-only row's
    caption template: the recipe's train.seed, so every command sees the captions training saw."""
    return dict(
        caption_templates=spec.caption_templates,
        label_names=spec.label_names,
        template_seed=seed,
        split_fraction=spec.split_fraction,
        split_part=spec.split_part,
        split_seed=spec.split_seed,
        shots_per_class=spec.shots_per_class,
        shots_seed=spec.shots_seed,
        path=spec.path,
        name=spec.name,
        revision=spec.revision,
        data_files=spec.data_files,
        split=spec.split,
        image_column=spec.image_column,
        caption_column=spec.caption_column,
        image_id_column=spec.image_id_column,
        label_column=spec.label_column,
        max_samples=spec.max_samples,
        synthetic=spec.synthetic.model_dump() if spec.synthetic is not None else None,
    )


def resolve_max_text_length(cfg: RecipeConfig) -> int:
    """The caption token limit, checked against the model's config before weights or data are loaded."""
    if cfg.model.text_tower is not None:
        config = text_swap_config(cfg.model.name_or_path, cfg.model.text_tower, cfg.model.revision, cfg.model.trust_remote_code)
    else:
        config = load_model_config(cfg.model.name_or_path, cfg.model.revision, cfg.model.trust_remote_code)
    limit = model_layout(config).text_position_limit
    if cfg.data.max_text_length is not None and cfg.data.max_text_length > limit:
        raise ConfigError(
            "recipe",
            [
                f"data.max_text_length: {cfg.data.max_text_length} is more than the text tower of "
                f"model.name_or_path={cfg.model.name_or_path} can read ({limit} tokens); use at most {limit}"
            ],
        )
    return cfg.data.max_text_length or limit
