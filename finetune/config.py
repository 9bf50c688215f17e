"""The recipe schema: one typed, nested config that every YAML recipe maps onto.

Defaults live here and only here. `load_config(path, overrides)` reads a recipe, applies
`key.sub=value` overrides, validates everything at once and raises `ConfigError` listing every
problem with its dotted path, so a user fixes a recipe in one pass instead of one error per run.
"""

from __future__ import annotations

import difflib
import os
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """A recipe or override is invalid; the message lists every problem with its dotted path."""

    def __init__(self, source: str, problems: list[str]):
        self.problems = problems
        header = f"Invalid recipe {source} ({len(problems)} problem{'s' if len(problems) != 1 else ''}):"
        super().__init__("\n".join([header, *(f"  {p}" for p in problems)]))


def looks_like_local_path(value: str) -> bool:
    """Hub ids are `name` or `org/name`; anything anchored or deeper is a local path.

    Used to tell a missing local folder (an error we can report now) from a hub id (which is
    resolved by `from_pretrained` / `load_dataset` at load time).
    """
    return value.startswith(("/", "./", "../", "~")) or value.count("/") >= 2 or os.path.exists(value)


def _existing_if_local(value: str | None) -> str | None:
    if value is not None and looks_like_local_path(value) and not os.path.exists(os.path.expanduser(value)):
        raise ValueError(f"path does not exist: {value}")
    return value


HubIdOrPath = Annotated[str, AfterValidator(_existing_if_local)]


class Section(BaseModel):
    """Every section forbids unknown keys: a typo must never silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


# --------------------------------------------------------------------------- model


class ModelConfig(Section):
    name_or_path: HubIdOrPath = Field(
        description="Hub id (e.g. openai/clip-vit-base-patch16) or local folder of a CLIPModel + processor."
    )
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the checkpoint. Off unless needed.")
    train_logit_scale: bool = Field(default=False, description="Let the learned temperature move during adaptation.")
    train_projections: bool = Field(
        default=False, description="Fully train visual_projection and text_projection (saved with the adapter)."
    )
    quantization: Literal["none", "8bit", "4bit"] = Field(
        default="none",
        description="QLoRA: load the frozen base through bitsandbytes in 8 or 4 bits (less memory); LoRA trains on top.",
    )
    quant_type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type (nf4 suits normal weights).")
    double_quant: bool = Field(default=True, description="4-bit: quantize the quantization constants too (~0.4 bit/param less).")
    compute_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="4-bit: dtype the dequantized weights are multiplied in (bfloat16 on GPUs)."
    )

    @model_validator(mode="after")
    def warn_ignored_quantization_keys(self) -> "ModelConfig":
        four_bit_only = sorted(  # only values a user changed: a resolved config spells out every default
            k for k in self.model_fields_set & {"quant_type", "double_quant", "compute_dtype"}
            if getattr(self, k) != type(self).model_fields[k].default
        )
        if four_bit_only and self.quantization != "4bit":
            warnings.warn(
                f"model.quantization is {self.quantization!r}: "
                + ", ".join(f"model.{k}" for k in four_bit_only) + " ignored (4bit only)",
                stacklevel=2,
            )
        return self


# --------------------------------------------------------------------------- LoRA


class LoraTowerConfig(Section):
    enabled: bool = Field(default=True, description="False leaves this tower frozen.")
    rank: int = Field(default=8, gt=0, description="LoRA rank r: more capacity, more memory.")
    alpha: float = Field(default=16.0, gt=0, description="Scaling numerator; the update is scaled by alpha / rank.")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"],
        min_length=1,
        description="Linear layers inside each encoder layer, by name or dotted suffix (e.g. mlp.fc1).",
    )
    layers: list[int] | None = Field(
        default=None, description="Encoder layer indices to adapt (negative counts from the end); null = all."
    )


class LoraConfig(Section):
    vision: LoraTowerConfig = Field(default_factory=LoraTowerConfig)
    text: LoraTowerConfig = Field(default_factory=LoraTowerConfig)


# --------------------------------------------------------------------------- data


class SyntheticSpec(Section):
    domain: Literal["source", "target"] = Field(description="Which procedural domain to generate.")
    num_images: int = Field(gt=0, description="Images to generate.")
    captions_per_image: int = Field(default=1, gt=0, description="Captions per image (paraphrases).")
    image_size: int = Field(default=32, ge=16, description="Generated image side in pixels.")
    seed: int = Field(default=0, description="Same seed, same dataset.")


class DatasetSpec(Section):
    """One split of an image-caption dataset, loaded with `datasets.load_dataset` or generated."""

    path: HubIdOrPath | None = Field(
        default=None,
        description="load_dataset path: hub dataset id, local folder, or a builder (parquet, imagefolder, csv).",
    )
    name: str | None = Field(default=None, description="Dataset configuration name.")
    revision: str | None = Field(default=None, description="Hub revision to pin.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(
        default=None, description="Files for a builder path (globs allowed)."
    )
    split: str = Field(default="train", description="Split, slicing allowed: train[:95%].")
    image_column: str = Field(default="image", description="Column holding the image.")
    caption_column: str = Field(default="caption", description="Column holding a caption or a list of captions.")
    image_id_column: str | None = Field(
        default=None, description="Rows sharing this id are one image with several captions; null = row index."
    )
    label_column: str | None = Field(default=None, description="Optional class label (for per-class statistics).")
    max_samples: int | None = Field(default=None, gt=0, description="Keep the first N rows (quick runs).")
    synthetic: SyntheticSpec | None = Field(
        default=None, description="Generate a procedural domain instead of loading one (the offline demo)."
    )

    @model_validator(mode="after")
    def path_xor_synthetic(self) -> "DatasetSpec":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of `path` (a dataset to load) and `synthetic` (a generated one)")
        return self


class EvalSetsConfig(Section):
    target: DatasetSpec = Field(description="The domain you adapt to: zero-shot vs adapted is measured here.")
    source: DatasetSpec | None = Field(
        default=None, description="Optional retention set from the original domain, to see what adaptation costs."
    )


class DataConfig(Section):
    train: DatasetSpec
    eval: EvalSetsConfig
    max_text_length: int | None = Field(
        default=None, gt=1, description="Token limit per caption; null = the model's max_position_embeddings."
    )
    num_workers: int | Literal["auto"] = Field(
        default="auto",
        description="DataLoader worker processes (decode + preprocess); auto = cores per process - 1, at least 1.",
    )
    @field_validator("num_workers")
    @classmethod
    def workers_not_negative(cls, value):
        if value != "auto" and value < 0:
            raise ValueError(f"must be >= 0 or auto, got {value}")
        return value

    decode_draft: bool = Field(
        default=True,
        description="Training JPEGs decode at 1/2-1/8 scale when still >= the model's input size: less work, "
        "pixels within a few levels of a full decode (eval always decodes fully).",
    )
    cache_preprocessed: bool = Field(
        default=False,
        description="Resize training images to the processor's size once (stored with datasets); "
        "later epochs skip decode + resize. Same tensors.",
    )


# --------------------------------------------------------------------------- loss / optim / train / eval


class LossConfig(Section):
    kind: Literal["infonce"] = Field(default="infonce", description="Symmetric InfoNCE (CLIP's loss).")
    gather_across_processes: bool = Field(
        default=True, description="Use every process's batch as negatives (the global batch), as CLIP does."
    )


class OptimConfig(Section):
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW decoupled decay on LoRA weights (not the logit scale).")
    betas: tuple[float, float] = Field(default=(0.9, 0.98), description="AdamW betas; CLIP uses beta2=0.98.")
    eps: float = Field(default=1e-6, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(default=1.0, gt=0, description="Clip the global gradient norm; null = off.")
    scheduler: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="Decay after warmup.")
    warmup_steps: int | None = Field(default=None, ge=0, description="Linear warmup in optimizer steps.")
    warmup_ratio: float | None = Field(default=None, ge=0, lt=1, description="Warmup as a fraction of max steps.")

    @model_validator(mode="after")
    def warmup_steps_xor_ratio(self) -> "OptimConfig":
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        return self


class TrainConfig(Section):
    output_dir: str = Field(default="runs/default", description="Everything a run writes goes here.")
    seed: int = Field(default=0, description="Seeds model init of LoRA, data order and dropout.")
    batch_size: int = Field(
        default=64,
        gt=0,
        description="Per process. Each pair sees up to batch_size x processes - 1 negatives "
        "(batch_size - 1 with loss.gather_across_processes: false).",
    )
    gradient_accumulation_steps: int = Field(
        default=1,
        gt=0,
        description="Averages gradients over micro-batches; it does NOT add negatives to the contrastive loss.",
    )
    micro_batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Rows embedded with autograd at once (GradCache): memory of micro_batch_size, negatives of "
        "batch_size. null = the whole batch at once.",
    )
    max_steps: int | None = Field(default=None, gt=0, description="Optimizer steps to run.")
    epochs: float | None = Field(default=None, gt=0, description="Alternative to max_steps.")
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no", description="bf16 on CPUs and recent GPUs; fp16 (with loss scaling) for GPUs without bf16."
    )
    @field_validator("mixed_precision", mode="before")
    @classmethod
    def yaml_no_is_false(cls, value):
        # YAML 1.1 reads a bare `no` as False; accept it for the key users type most.
        return "no" if value is False else value

    enable_gradient_checkpointing: bool = Field(default=False, description="Less memory, ~30% slower steps.")
    log_every_steps: int = Field(default=10, gt=0, description="Write loss, lr and logit scale to train_log.jsonl.")
    checkpoint_every_steps: int | None = Field(default=None, gt=0, description="null = only the final checkpoint.")
    keep_last_checkpoints: int = Field(default=2, gt=0, description="Older complete checkpoints are deleted.")
    resume_from: str | None = Field(default=None, description="`latest` or a checkpoint folder.")

    @model_validator(mode="after")
    def steps_xor_epochs(self) -> "TrainConfig":
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.max_steps and train.epochs")
        return self

    @model_validator(mode="after")
    def micro_batch_fits_batch(self) -> "TrainConfig":
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size:
            raise ValueError(
                f"train.micro_batch_size ({self.micro_batch_size}) must be <= train.batch_size ({self.batch_size}): "
                "it splits the contrastive batch for memory"
            )
        return self

    @model_validator(mode="after")
    def resume_path_exists(self) -> "TrainConfig":
        if self.resume_from not in (None, "latest") and not os.path.isdir(self.resume_from):
            raise ValueError(f"train.resume_from: checkpoint folder does not exist: {self.resume_from}")
        return self


class EvalConfig(Section):
    batch_size: int = Field(default=256, gt=0, description="Images or captions embedded per forward pass.")
    every_steps: int | None = Field(default=None, gt=0, description="Evaluate the target set during training.")
    ks: list[int] = Field(default_factory=lambda: [1, 5, 10], min_length=1, description="Recall@K cut-offs.")
    zero_shot: bool = Field(default=True, description="Measure the unadapted model first (the baseline).")


class RecipeConfig(Section):
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    # A dict, not TrainConfig(): the default is invalid (no max_steps/epochs), and validating it here
    # reports that as `train: ...` next to every other problem instead of aborting the whole recipe.
    train: TrainConfig = Field(default_factory=dict)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def some_tower_trains(self) -> "RecipeConfig":
        if not (self.lora.vision.enabled or self.lora.text.enabled):
            raise ValueError("lora.vision.enabled and lora.text.enabled are both false: nothing would be adapted")
        return self

    @model_validator(mode="after")
    def warn_ignored_keys(self) -> "RecipeConfig":
        for tower in ("vision", "text"):
            cfg: LoraTowerConfig = getattr(self.lora, tower)
            ignored = sorted(cfg.model_fields_set - {"enabled"})
            if not cfg.enabled and ignored:
                warnings.warn(
                    f"lora.{tower}.enabled is false: {', '.join(f'lora.{tower}.{k}' for k in ignored)} ignored",
                    stacklevel=2,
                )
        if self.train.gradient_accumulation_steps > 1:
            warnings.warn(
                "train.gradient_accumulation_steps > 1 averages gradients but each contrastive loss still sees "
                f"only train.batch_size={self.train.batch_size} x processes negatives; for more negatives in the "
                "same memory raise train.batch_size and set train.micro_batch_size",
                stacklevel=2,
            )
        return self


# --------------------------------------------------------------------------- loading


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
    model: type[BaseModel] | None = RecipeConfig
    for part in loc:
        if model is None:
            return None
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        model = section_type(field.annotation)
    return model


def section_type(annotation: Any) -> type[BaseModel] | None:
    """The section model behind a field's annotation (`LoraTowerConfig`, `DatasetSpec | None`), if any."""
    for arg in (annotation, *typing.get_args(annotation)):
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def describe_errors(error: ValidationError) -> list[str]:
    problems = []
    for err in error.errors():
        loc = tuple(str(p) for p in err["loc"])
        path = ".".join(loc) or "<root>"
        if err["type"] == "extra_forbidden":
            parent = _schema_at(loc[:-1])
            hint = ""
            if parent is not None:
                close = difflib.get_close_matches(loc[-1], list(parent.model_fields), n=1, cutoff=0.6)
                hint = f"; did you mean '{'.'.join((*loc[:-1], close[0]))}'?" if close else (
                    f"; valid keys here: {', '.join(parent.model_fields)}"
                )
            problems.append(f"{path}: unknown key{hint}")
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
    return validate_config(yaml.safe_load(path.read_text()) or {}, source=str(path))


def save_config(cfg: RecipeConfig, path: str | os.PathLike) -> None:
    """Write the fully resolved config (every default spelled out); later steps read it back from here."""
    from finetune.io import atomic_write_text

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
