"""Read a recipe: YAML + `key.sub=value` overrides, validated at once; every problem reported with its
dotted path and a "did you mean"; the resolved config saved beside every run and read back from there."""

from __future__ import annotations

import difflib
import os
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ValidationError,
)

from finetune.config.schema import LOSS_TERMS, LossTermConfig, RecipeConfig
from finetune.errors import ConfigError


def parse_override(text: str) -> tuple[list[str], Any]:
    """`lora.vision.rank=8` -> (["lora", "vision", "rank"], 8); values parse as YAML (8, 1e-4, null, [1, 2])."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("overrides", [f"{text!r}: overrides look like key.sub=value"])
    return key.split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_override(tree: dict, keys: list[str], value: Any) -> None:
    node = tree
    for key in keys[:-1]:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[keys[-1]] = value


def _schema_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns location `loc`, to suggest its field names."""
    return _walk(loc)[1]


def _walk(loc: tuple) -> tuple[tuple[str, ...], type[BaseModel] | None]:
    """(`loc` as the user wrote it, the model owning its last part): a list of tagged terms
    (`loss.terms`) shows in pydantic's locations with the tag, `terms.1.siglip.beta`; the user wrote
    `terms.1.beta`."""
    model: type[BaseModel] | None = RecipeConfig
    parts, clean = list(loc), []
    while parts:
        part = parts.pop(0)
        clean.append(str(part))
        field = model.model_fields.get(str(part)) if model is not None else None
        if field is None:
            model = None
            continue
        tagged = _tagged_items(field.annotation)
        if tagged is not None and parts and isinstance(parts[0], int):
            clean.append(str(parts.pop(0)))
            model = tagged.get(parts.pop(0)) if parts and parts[0] in tagged else None
            continue
        model = section_type(field.annotation)
    return tuple(clean), model


def _tagged_items(annotation: Any) -> dict[str, type[BaseModel]] | None:
    """{tag: model} for a list of a union tagged by `name` (loss.terms), else None."""
    return LOSS_TERMS if annotation == list[LossTermConfig] else None


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model behind a field's annotation (`LoraTowerConfig`, `DatasetSpec | None`), if any."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def describe_errors(error: ValidationError) -> list[str]:
    problems = []
    for err in error.errors():
        loc, parent = _walk(tuple(err["loc"]))
        path = ".".join(loc) or "<root>"
        if err["type"] == "extra_forbidden":
            parent = _walk(tuple(err["loc"])[:-1])[1]
            hint = ""
            if parent is not None:
                close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.6)
                hint = (
                    f"; did you mean '{'.'.join((*loc[:-1], close[0]))}'?"
                    if close
                    else (f"; valid keys here: {', '.join(parent.model_fields)}")
                )
            problems.append(f"{path}: unknown key{hint}")
        elif err["type"] in ("union_tag_invalid", "union_tag_not_found") and _tagged_items(_field_at(loc)) is not None:
            tags = list(_tagged_items(_field_at(loc)))
            if err["type"] == "union_tag_not_found":
                problems.append(f"{path}.name: required key is missing (one of {', '.join(tags)})")
                continue
            tag = str(err["ctx"]["tag"])
            close = difflib.get_close_matches(tag, tags, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            problems.append(f"{path}.name: unknown term {tag!r}{hint} (terms: {', '.join(tags)})")
        elif err["type"] == "missing":
            problems.append(f"{path}: required key is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            show_got = err["type"] != "value_error" and not isinstance(got, dict)
            # Cross-field validators already name their keys ("set train.max_steps or ..."); don't prefix twice.
            prefix = "" if msg.startswith(f"{path}.") else f"{path}: "
            problems.append(f"{prefix}{msg}" + (f", got {got!r}" if show_got else ""))
    return problems


def _field_at(loc: tuple[str, ...]) -> Any:
    """The annotation of the field holding list item `loc` (e.g. ('loss', 'terms', '1')), if any."""
    owner = _walk(loc[:-2])[1] if len(loc) >= 2 else None
    field = owner.model_fields.get(loc[-2]) if owner is not None else None
    return field.annotation if field is not None else None


def load_config(recipe: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> RecipeConfig:
    """Read a recipe YAML, apply `key.sub=value` overrides, validate. Raises ConfigError listing every problem."""
    recipe = Path(recipe)
    if not recipe.is_file():
        raise ConfigError(str(recipe), [f"recipe file not found: {recipe}"])
    try:
        tree = yaml.safe_load(recipe.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(str(recipe), [f"not valid YAML: {exc}"]) from None
    if not isinstance(tree, dict):
        raise ConfigError(str(recipe), ["the top level must be a mapping of sections (model, lora, data, ...)"])
    for text in overrides:
        apply_override(tree, *parse_override(text))
    return validate_config(tree, source=str(recipe))


def validate_config(tree: dict, source: str = "<dict>") -> RecipeConfig:
    try:
        return RecipeConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(source, describe_errors(exc)) from None


def load_resolved_config(path: str | os.PathLike) -> RecipeConfig:
    """The resolved config a run wrote (`config.yaml` in its output folder), validated again."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"no resolved config at {path}: is {path.parent} a run folder?"])
    # Every default is spelled out in a resolved config, so "key X ignored" notices would be about keys
    # the user never set; they were shown when the run was configured.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return validate_config(yaml.safe_load(path.read_text()) or {}, source=str(path))


def save_config(cfg: RecipeConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every default spelled out); later steps read it back from here."""
    from finetune.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
