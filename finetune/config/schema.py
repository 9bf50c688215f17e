"""The recipe schema: one typed, nested config that every YAML recipe maps onto.

Defaults live here and only here. `load_config(path, overrides)` reads a recipe, applies
`key.sub=value` overrides, validates everything at once and raises `ConfigError` listing every
problem with its dotted path, so a user fixes a recipe in one pass instead of one error per run.
"""

from __future__ import annotations

import os
import warnings
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)


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
    name_or_path: HubIdOrPath = Field(description="Hub id (e.g. openai/clip-vit-base-patch16) or local folder of a CLIPModel + processor.")
    revision: str | None = Field(default=None, description="Hub revision (branch, tag or commit) to pin.")
    trust_remote_code: bool = Field(default=False, description="Run code shipped with the checkpoint. Off unless needed.")
    train_logit_scale: bool = Field(default=False, description="Let the learned temperature move during adaptation.")
    train_projections: bool = Field(
        default=False, description="Fully train visual_projection and text_projection (saved with the adapter)."
    )
    text_tower: HubIdOrPath | None = Field(
        default=None,
        description="Swap the text tower for this encoder (hub id or folder, e.g. xlm-roberta-base): a vision + text "
        "dual encoder keeping model.name_or_path's vision tower, visual projection and temperature.",
    )
    attn_implementation: Literal["auto", "sdpa", "eager"] = Field(
        default="auto",
        description="Attention kernel of both towers. auto: eager for a tower of <= 200 tokens when training on a CPU "
        "in bf16 (there PyTorch's fused attention backward is slower: ViT-B/32 steps 1.4x faster), sdpa otherwise.",
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
            k
            for k in self.model_fields_set & {"quant_type", "double_quant", "compute_dtype"}
            if getattr(self, k) != type(self).model_fields[k].default
        )
        if four_bit_only and self.quantization != "4bit":
            warnings.warn(
                f"model.quantization is {self.quantization!r}: " + ", ".join(f"model.{k}" for k in four_bit_only) + " ignored (4bit only)",
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
    layers: list[int] | None = Field(default=None, description="Encoder layer indices to adapt (negative counts from the end); null = all.")


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
    languages: list[str] = Field(
        default_factory=lambda: ["en"],
        min_length=1,
        description="Caption languages (ISO 639-1: en, de, es, zh); other than en, source domain only.",
    )

    @model_validator(mode="after")
    def known_languages(self) -> "SyntheticSpec":
        from data_tools.synthetic.multilingual import check_languages

        check_languages(self.languages)
        if self.languages != ["en"] and self.domain != "source":
            raise ValueError(f"languages {self.languages} need domain: source (the only domain with translations)")
        return self


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
    caption_column: str | list[str] | None = Field(
        default="caption",
        description="Column holding a caption or a list of captions; several columns = several captions of one image; "
        "null for a label-only set (captions from caption_templates).",
    )
    image_id_column: str | None = Field(
        default=None, description="Rows sharing this id are one image with several captions; null = row index."
    )
    label_column: str | None = Field(
        default=None,
        description="Class label column: per-class statistics, class-level evaluation, long-tail sampling and weights.",
    )
    max_samples: int | None = Field(default=None, gt=0, description="Keep the first N rows (quick runs).")
    synthetic: SyntheticSpec | None = Field(
        default=None, description="Generate a procedural domain instead of loading one (the offline demo)."
    )
    caption_templates: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Templates with {label}, e.g. 'an EL image of a {label} solar cell'. With caption_column: null they "
        "are the captions (one drawn per sample per epoch, seeded); always the class prompts of label-aware evaluation.",
    )
    label_names: dict[str, str] | None = Field(
        default=None, description="Raw label -> words used in templates (e.g. {'0': 'cracked'}); unmapped labels stay as they are."
    )
    split_fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Split a source that has one split, by image (never one image on both sides): this fraction of "
        "images is the eval side. Use the same value and split_seed on the train and eval specs.",
    )
    split_part: Literal["train", "eval"] = Field(default="train", description="With split_fraction: which side this spec keeps.")
    split_seed: int = Field(default=0, description="With split_fraction: same seed, same split.")
    shots_per_class: int | None = Field(
        default=None,
        gt=0,
        description="Few-shot: keep k images per class (after max_samples and split_fraction), drawn with shots_seed: "
        "classes in sorted order, one seeded shuffle of each class's images, the first k kept (so a seed's k-shot set "
        "holds its smaller ones); a class with fewer keeps all, with a warning. Needs label_column. null = every image.",
    )
    shots_seed: int = Field(default=0, description="With shots_per_class: same seed, same images.")

    @model_validator(mode="after")
    def shots_need_labels(self) -> "DatasetSpec":
        if self.shots_per_class is not None and self.label_column is None:
            raise ValueError(f"shots_per_class={self.shots_per_class} draws images per class: set label_column too")
        return self

    @model_validator(mode="after")
    def path_xor_synthetic(self) -> "DatasetSpec":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of `path` (a dataset to load) and `synthetic` (a generated one)")
        return self

    @field_validator("caption_templates")
    @classmethod
    def templates_name_the_label(cls, templates: list[str] | None) -> list[str] | None:
        for i, template in enumerate(templates or []):
            if "{label}" not in template:
                raise ValueError(f"template {i} ({template!r}) has no {{label}} placeholder")
            try:
                template.format(label="x")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"template {i} ({template!r}) is not a format string with only {{label}}: {exc!r}") from None
        return templates

    @model_validator(mode="after")
    def label_only_needs_templates_and_labels(self) -> "DatasetSpec":
        if self.caption_column is None and not self.caption_templates:
            raise ValueError("caption_column is null (a label-only set): set caption_templates to turn labels into captions")
        if self.caption_templates and self.label_column is None:
            raise ValueError("caption_templates are filled from labels: set label_column too")
        if self.label_names and self.label_column is None:
            raise ValueError("label_names maps labels: set label_column too")
        return self


class ReplaySpec(DatasetSpec):
    """A dataset mixed into training by fraction (e.g. source-domain data against forgetting)."""

    fraction: float = Field(gt=0, lt=1, description="Share of every training epoch drawn from this set (0.1 = 10%).")


class EvalSetsConfig(Section):
    target: DatasetSpec | None = Field(default=None, description="The domain you adapt to: zero-shot vs adapted is measured here.")
    source: DatasetSpec | None = Field(
        default=None, description="Optional retention set from the original domain, to see what adaptation costs."
    )
    languages: dict[str, DatasetSpec] | None = Field(
        default=None,
        description="One eval set per language, keyed by ISO 639-1 code (en, de, zh...); results.json uses the "
        "codes as set names. With model.text_tower, `en` is also scored by the original CLIP text tower.",
    )

    @model_validator(mode="after")
    def some_eval_set(self) -> "EvalSetsConfig":
        if self.target is None and not self.languages:
            raise ValueError("set data.eval.target or data.eval.languages: nothing would be evaluated")
        clash = sorted({"target", "source"} & set(self.languages or {}))
        if clash:
            raise ValueError(f"data.eval.languages: {clash} are names of the other eval sets; use ISO codes")
        return self


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
        "later epochs skip decode + resize. Same tensors. With augment.image.* on, the cache holds the "
        "pre-augmentation images; augmentation is drawn on top of them every epoch.",
    )
    image_size: int | None = Field(
        default=None,
        gt=0,
        description="Train and evaluate at this square resolution instead of the checkpoint's "
        "(position embeddings interpolated); saved with the adapter's processor. null = the checkpoint's size.",
    )
    replay: list[ReplaySpec] = Field(
        default_factory=list,
        description="Extra training sets mixed in by fraction, e.g. 10-30% source-domain data against forgetting.",
    )

    @model_validator(mode="after")
    def replay_fractions_leave_room(self) -> "DataConfig":
        total = sum(r.fraction for r in self.replay)
        if total >= 1:
            raise ValueError(f"data.replay: fractions sum to {total:g}; they must leave room for data.train (sum < 1)")
        return self


# --------------------------------------------------------------------------- sampling


class SamplingConfig(Section):
    kind: Literal["uniform", "class_balanced", "power", "repeat_factor"] = Field(
        default="uniform",
        description="uniform: every pair once per epoch; class_balanced: classes equally often; power: class c "
        "~ n_c^power (0.5 = square-root); repeat_factor: LVIS repeat-factor sampling. All but uniform need data.train.label_column.",
    )
    power: float = Field(default=0.5, ge=0, le=1, description="kind=power: 0 = class-balanced, 0.5 = square-root, 1 = uniform.")
    repeat_threshold: float = Field(
        default=0.1, gt=0, le=1, description="kind=repeat_factor: classes rarer than this fraction of the data are repeated."
    )


# --------------------------------------------------------------------------- loss / optim / train / eval


class LossTerm(Section):
    name: str = Field(description="The term; each subclass pins one name.")
    weight: float = Field(
        default=1.0, gt=0, description="Multiplies the term; the loop sums the weighted terms. Remove a term to turn it off."
    )


class InfoNCETerm(LossTerm):
    """Symmetric InfoNCE with CLIP's temperature (model.logit_scale); honours loss.class_weights."""

    name: Literal["infonce"]


class HardnessWeightedInfoNCETerm(LossTerm):
    """InfoNCE with negatives re-weighted by exp(beta * logit) (HN-NCE); honours loss.class_weights."""

    name: Literal["hn_infonce"]
    beta: float = Field(default=0.5, ge=0, description="Hardness concentration on the logits s/tau; 0 = plain InfoNCE.")


class SigLIPTerm(LossTerm):
    """Pairwise sigmoid loss with its own learned temperature and bias (not CLIP's logit_scale)."""

    name: Literal["siglip"]
    temperature_init: float = Field(default=10.0, gt=0, description="Initial t = exp(t'); the paper's t' = log 10. Learned.")
    bias_init: float = Field(default=-10.0, description="Initial bias b (the paper's -10). Learned.")


class VSEppTerm(LossTerm):
    """VSE++ max-violation triplet: the hardest negative per anchor, both directions, on cosine similarity."""

    name: Literal["vsepp"]
    margin: float = Field(default=0.2, ge=0, description="Hinge margin on cosine similarity (VSE++ uses 0.2).")


class SemiHardTerm(LossTerm):
    """FaceNet semi-hard triplet: the hardest negative still less similar than the positive."""

    name: Literal["semihard"]
    margin: float = Field(default=0.2, ge=0, description="Hinge margin on cosine similarity.")


class MarginRankingTerm(LossTerm):
    """Hinge summed over every negative, mean over anchors, both directions."""

    name: Literal["margin_ranking"]
    margin: float = Field(default=0.2, ge=0, description="Hinge margin on cosine similarity.")


class AdversarialTerm(LossTerm):
    """A modality discriminator behind a gradient reversal layer (ACMR): pushes image and text embeddings together."""

    name: Literal["adversarial"]
    weight: float = Field(default=0.1, gt=0, description="Multiplies the discriminator's BCE (for it and, reversed, for the towers).")
    hidden_dim: int = Field(default=256, gt=0, description="Width of the discriminator MLP's hidden layer.")
    reversal: float = Field(
        default=1.0, gt=0, description="Gradient reversal factor: the towers get -reversal x the discriminator's gradient."
    )


LOSS_TERMS: dict[str, type[LossTerm]] = {
    t.model_fields["name"].annotation.__args__[0]: t
    for t in (InfoNCETerm, HardnessWeightedInfoNCETerm, SigLIPTerm, VSEppTerm, SemiHardTerm, MarginRankingTerm, AdversarialTerm)
}
CLASS_WEIGHTED_TERMS = ("infonce", "hn_infonce")  # the terms that multiply each pair's loss by its class weight
CLIP_TEMPERATURE_TERMS = ("infonce", "hn_infonce")  # the terms that read model.logit_scale
LossTermConfig = Annotated[
    InfoNCETerm | HardnessWeightedInfoNCETerm | SigLIPTerm | VSEppTerm | SemiHardTerm | MarginRankingTerm | AdversarialTerm,
    Field(discriminator="name"),
]


class LossConfig(Section):
    terms: list[LossTermConfig] = Field(
        default_factory=lambda: [InfoNCETerm(name="infonce", weight=1.0)],
        min_length=1,
        description="Named loss terms with weights, summed: infonce, hn_infonce, siglip, vsepp, semihard, margin_ranking, "
        "adversarial (see README, Losses). A bare name takes the term's defaults.",
    )
    gather_across_processes: bool = Field(
        default=True, description="Use every process's batch as negatives (the global batch), as CLIP does."
    )
    same_label_negatives: bool = Field(
        default=True,
        description="false: pairs sharing a class label are not each other's negatives (supervised-contrastive view). Needs labels.",
    )
    class_weights: Literal["none", "inverse_frequency", "effective_number"] = Field(
        default="none",
        description="Per-pair class weights in the infonce and hn_infonce terms, mean 1 over the training pairs. Needs labels.",
    )
    class_weight_beta: float = Field(
        default=0.999,
        ge=0,
        lt=1,
        description="class_weights=effective_number: beta of Cui et al. 2019 (closer to 1 = closer to inverse frequency).",
    )

    @model_validator(mode="before")
    @classmethod
    def kind_became_terms(cls, data: Any) -> Any:
        # `loss.kind: infonce` (the only value it ever had) is what older recipes and run folders hold:
        # the same as the default terms, so it is accepted and dropped.
        if isinstance(data, dict) and "kind" in data:
            data = dict(data)
            kind = data.pop("kind")
            if kind != "infonce":
                raise ValueError(
                    f"loss.kind was replaced by loss.terms (got kind={kind!r}): write loss.terms: [{{name: infonce, weight: 1.0}}, ...]"
                )
        return data

    @field_validator("terms", mode="before")
    @classmethod
    def bare_names_are_terms(cls, value: Any) -> Any:
        # `terms: [infonce, siglip]` (or the override loss.terms=[infonce,siglip]) takes each term's defaults.
        if isinstance(value, list):
            return [{"name": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def names_are_unique(self) -> "LossConfig":
        seen: dict[str, int] = {}
        for i, term in enumerate(self.terms):
            if term.name in seen:
                raise ValueError(
                    f"loss.terms.{i}.name: {term.name} is already loss.terms.{seen[term.name]}; use one term with the summed weight"
                )
            seen[term.name] = i
        return self

    @model_validator(mode="after")
    def a_term_aligns_pairs(self) -> "LossConfig":
        if all(t.name == "adversarial" for t in self.terms):
            raise ValueError(
                "loss.terms: adversarial alone never pulls an image towards its caption; add a contrastive term (e.g. infonce)"
            )
        return self

    @model_validator(mode="after")
    def warn_terms_without_class_weights(self) -> "LossConfig":
        if self.class_weights == "none":
            return self
        ignoring = [f"loss.terms.{i} ({t.name})" for i, t in enumerate(self.terms) if t.name not in CLASS_WEIGHTED_TERMS]
        if ignoring:
            warnings.warn(
                f"loss.class_weights={self.class_weights}: {', '.join(ignoring)} ignore class weights "
                f"(only {' and '.join(CLASS_WEIGHTED_TERMS)} weight pairs by class)",
                stacklevel=2,
            )
        return self


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
    max_steps: int | None = Field(
        default=None, ge=0, description="Optimizer steps to run (0 only with distill: stage 1 alone, no contrastive stage)."
    )
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
    baselines: list[Literal["linear_probe", "knn"]] = Field(
        default_factory=lambda: ["linear_probe", "knn"],
        description="Classification baselines on the frozen base model's image features, fitted on the labelled data.train "
        "and reported beside zero-shot and adapted on every labelled eval set ([] turns them off; no effect without labels).",
    )


class ExportConfig(Section):
    """How `domainclip export` picks the adapter scale and when a quantized export is refused."""

    alpha: float = Field(
        default=1.0, ge=0, description="Adapter scale merged by `export` without --alpha: W = W0 + alpha * BA (0 = base, 1 = adapted)."
    )
    alpha_sweep: list[float] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
        min_length=1,
        description="Alphas `export --alpha-sweep` evaluates when given no list of its own.",
    )
    select_direction: Literal["t2i", "i2t"] = Field(default="t2i", description="Retrieval direction the alpha rule reads.")
    select_metric: str = Field(default="R@1", description="Recall the alpha rule maximises on the target set (R@K, K in eval.ks).")
    min_source_retention: float = Field(
        default=0.95,
        ge=0,
        le=1,
        description="Alpha rule: keep source select_metric >= this fraction of alpha=0's (zero-shot); ignored without data.eval.source.",
    )
    if_no_alpha_qualifies: Literal["error", "most_retention"] = Field(
        default="error",
        description="No swept alpha > 0 keeps the source: stop with the table (error) or take the alpha > 0 with the best source score.",
    )
    max_r1_drop: float = Field(
        default=0.5, ge=0, description="Quality gate: largest target R@1 drop (points, either direction) a quantized export may show."
    )

    @field_validator("alpha_sweep")
    @classmethod
    def sweep_has_base_and_a_candidate(cls, value: list[float]) -> list[float]:
        if 0.0 not in value or not any(a > 0 for a in value) or any(a < 0 for a in value):
            raise ValueError(f"needs 0 (the base, the retention reference), at least one alpha > 0 and none < 0, got {value}")
        return value

    @field_validator("select_metric")
    @classmethod
    def recall_metric(cls, value: str) -> str:
        if not value.startswith("R@") or not value[2:].isdigit():
            raise ValueError(f"must be a recall like R@1, got {value!r}")
        return value


# --------------------------------------------------------------------------- augmentation


def _ordered_pair(name: str, value: tuple[float, float], low: float, high: float, low_open: bool = False) -> tuple[float, float]:
    lo, hi = value
    below = (lambda v: v <= low) if low_open else (lambda v: v < low)
    if below(lo) or below(hi) or lo > high or hi > high:
        bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
        raise ValueError(f"{name} must lie within {bound}, got {list(value)}")
    if lo > hi:
        raise ValueError(f"{name} must be ordered [low, high], got {list(value)}")
    return value


class RandomResizedCropConfig(Section):
    enabled: bool = Field(default=False, description="Crop a random part of the model's input and resize it back (RandomResizedCrop).")
    scale: tuple[float, float] = Field(
        default=(0.8, 1.0), description="[low, high] fraction of the input's area the crop keeps, within (0, 1]."
    )
    ratio: tuple[float, float] = Field(
        default=(3 / 4, 4 / 3), description="[low, high] aspect ratio (width / height) of the crop, within [0.25, 4]."
    )

    @field_validator("scale")
    @classmethod
    def scale_in_unit_interval(cls, value):
        return _ordered_pair("scale", value, 0.0, 1.0, low_open=True)

    @field_validator("ratio")
    @classmethod
    def ratio_ordered(cls, value):
        return _ordered_pair("ratio", value, 0.25, 4.0)


class HorizontalFlipConfig(Section):
    enabled: bool = Field(default=False, description="Mirror left-right. Never where laterality or text in the image matters.")
    p: float = Field(default=0.5, ge=0, le=1, description="Probability a sample is flipped.")


class RotationConfig(Section):
    enabled: bool = Field(default=False, description="Rotate by a small random angle about the centre.")
    degrees: float = Field(default=10.0, ge=0, le=45, description="Angle drawn uniformly from [-degrees, degrees], 0..45.")
    padding: Literal["zeros", "border", "reflection"] = Field(
        default="border", description="What fills the corners a rotation uncovers: black, the nearest edge pixel, or a mirror."
    )


class ColorJitterConfig(Section):
    enabled: bool = Field(default=False, description="Random brightness, contrast, saturation and hue, in a random order.")
    p: float = Field(default=0.8, ge=0, le=1, description="Probability a sample is jittered at all.")
    brightness: float = Field(default=0.2, ge=0, le=1, description="Factor drawn from [1 - b, 1 + b], 0..1 (0 = unchanged).")
    contrast: float = Field(default=0.2, ge=0, le=1, description="Factor drawn from [1 - c, 1 + c], 0..1 (blend with the mean grey).")
    saturation: float = Field(default=0.2, ge=0, le=1, description="Factor drawn from [1 - s, 1 + s], 0..1 (blend with greyscale).")
    hue: float = Field(default=0.0, ge=0, le=0.5, description="Hue shift drawn from [-h, h] turns of the colour wheel, 0..0.5.")


class ImageAugmentConfig(Section):
    """Applied in this order to the processor's resized input, before its normalisation; training only."""

    random_resized_crop: RandomResizedCropConfig = Field(default_factory=RandomResizedCropConfig)
    horizontal_flip: HorizontalFlipConfig = Field(default_factory=HorizontalFlipConfig)
    rotation: RotationConfig = Field(default_factory=RotationConfig)
    color_jitter: ColorJitterConfig = Field(default_factory=ColorJitterConfig)


class TextAugmentConfig(Section):
    word_dropout: float = Field(
        default=0.0, ge=0, lt=0.5, description="Probability each caption word is dropped (one word always kept); 0 = off, below 0.5."
    )
    word_swap: float = Field(default=0.0, ge=0, le=1, description="Probability a caption gets one swap of two adjacent words; 0 = off.")
    caption_templates: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Templates with {caption}, one drawn per sample per epoch, e.g. ['{caption}', 'a radiograph: {caption}']. null = off.",
    )

    @field_validator("caption_templates")
    @classmethod
    def templates_hold_the_caption(cls, templates: list[str] | None) -> list[str] | None:
        for i, template in enumerate(templates or []):
            if template.count("{caption}") != 1:
                raise ValueError(f"template {i} ({template!r}) needs exactly one {{caption}} placeholder")
        return templates


class AugmentConfig(Section):
    """Training-time augmentation, off by default; drawn from (train.seed, epoch, position in the epoch)."""

    image: ImageAugmentConfig = Field(default_factory=ImageAugmentConfig)
    text: TextAugmentConfig = Field(default_factory=TextAugmentConfig)

    def image_enabled(self) -> bool:
        i = self.image
        return i.random_resized_crop.enabled or i.horizontal_flip.enabled or i.rotation.enabled or i.color_jitter.enabled

    def text_enabled(self) -> bool:
        t = self.text
        return t.word_dropout > 0 or t.word_swap > 0 or bool(t.caption_templates)

    @model_validator(mode="after")
    def warn_ignored_transform_keys(self) -> "AugmentConfig":
        for name in ImageAugmentConfig.model_fields:
            section = getattr(self.image, name)
            ignored = sorted(  # only values a user changed: a resolved config spells out every default
                k for k in section.model_fields_set - {"enabled"} if getattr(section, k) != type(section).model_fields[k].default
            )
            if not section.enabled and ignored:
                warnings.warn(
                    f"augment.image.{name}.enabled is false: " + ", ".join(f"augment.image.{name}.{k}" for k in ignored) + " ignored",
                    stacklevel=2,
                )
        return self


class ParallelSyntheticSpec(Section):
    domain: Literal["source"] = Field(default="source", description="Domain whose captions are generated in parallel.")
    num_samples: int = Field(gt=0, description="Parallel rows (one concept and template each).")
    seed: int = Field(default=0, description="Same seed, same rows.")
    languages: list[str] = Field(
        default_factory=lambda: ["en", "de", "es", "zh"], min_length=1, description="Columns generated (ISO codes)."
    )

    @model_validator(mode="after")
    def known_languages(self) -> "ParallelSyntheticSpec":
        from data_tools.synthetic.multilingual import check_languages

        check_languages(self.languages)
        if "en" not in self.languages:
            raise ValueError("languages must include en: the teacher embeds the English caption")
        return self


class ParallelTextSpec(Section):
    """Parallel text for distillation: an English caption and its translations, one row per caption."""

    path: HubIdOrPath | None = Field(default=None, description="load_dataset path of a parallel-text dataset.")
    name: str | None = Field(default=None, description="Dataset configuration name.")
    revision: str | None = Field(default=None, description="Hub revision to pin.")
    data_files: str | list[str] | dict[str, str | list[str]] | None = Field(default=None, description="Files for a builder path.")
    split: str = Field(default="train", description="Split, slicing allowed.")
    english_column: str = Field(default="en", description="Column with the English caption (the teacher's input).")
    text_columns: list[str] = Field(
        default_factory=lambda: ["de", "es", "zh"],
        min_length=1,
        description="Columns with translations (the student's inputs), each mapped to the English caption's embedding.",
    )
    include_english: bool = Field(default=True, description="Also teach English -> English (keeps English retrieval).")
    max_samples: int | None = Field(default=None, gt=0, description="Keep the first N rows.")
    synthetic: ParallelSyntheticSpec | None = Field(
        default=None, description="Generate parallel captions of the demo's source domain (columns = languages)."
    )

    @model_validator(mode="after")
    def path_xor_synthetic(self) -> "ParallelTextSpec":
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("set exactly one of `path` (a dataset to load) and `synthetic` (generated parallel text)")
        return self


class DistillConfig(Section):
    """Stage 1 (M-CLIP style): the swapped text tower learns to map a caption in any language to the original
    CLIP text tower's embedding of its English caption. Text only; the vision tower is never touched."""

    data: ParallelTextSpec
    text_training: Literal["full", "lora"] = Field(
        default="full", description="full: every text-tower weight trains; lora: LoRA with lora.text.* (merged after)."
    )
    mse_weight: float = Field(default=1.0, ge=0, description="Weight of the MSE to the teacher's embedding (M-CLIP's loss).")
    cosine_weight: float = Field(default=0.0, ge=0, description="Weight of 1 - cosine to the teacher's embedding.")
    lr: float = Field(default=1e-4, gt=0, description="Peak learning rate (optim.* supplies betas, eps, decay, schedule).")
    batch_size: int = Field(default=64, gt=0, description="Captions per process and step.")
    max_steps: int = Field(gt=0, description="Optimizer steps of stage 1.")
    warmup_steps: int = Field(default=0, ge=0, description="Linear warmup in optimizer steps.")

    @model_validator(mode="after")
    def some_loss(self) -> "DistillConfig":
        if self.mse_weight == 0 and self.cosine_weight == 0:
            raise ValueError("distill.mse_weight and distill.cosine_weight are both 0: nothing to learn")
        return self


# --------------------------------------------------------------------------- mining


class MiningConfig(Section):
    """Offline cross-modal hard-negative mining (data_tools/mining.py) and the batch sampler that puts each
    anchor's mined negatives in its global batch. `domainclip mine` runs the mining alone."""

    enabled: bool = Field(
        default=False, description="Mine at step 0 (and every refresh_every_steps) and compose batches around the negatives."
    )
    directions: list[Literal["t2i", "i2t"]] = Field(
        default_factory=lambda: ["t2i", "i2t"],
        min_length=1,
        description="t2i: caption anchors, image negatives; i2t: image anchors (one per pair), caption negatives.",
    )
    negatives_per_anchor: int = Field(default=4, gt=0, description="Negatives kept per anchor and direction in the mined file.")
    rank_min: int = Field(default=1, ge=1, description="First search rank considered (1 = the nearest; positives count in the ranks).")
    rank_max: int = Field(default=64, ge=1, description="Last search rank considered: FAISS returns this many candidates per anchor.")
    absolute_margin: float = Field(default=0.0, ge=0, description="Keep a negative only if score <= positive score - this (cosine).")
    relative_margin: float = Field(
        default=0.05,
        ge=0,
        lt=1,
        description="Keep a negative only if score <= positive - this x abs(positive) (0.05: 95% of a positive score).",
    )
    near_duplicate_threshold: float = Field(
        default=0.98,
        gt=0,
        le=1,
        description="Guard: an image with cosine above this to the anchor's image is a near duplicate, never a negative.",
    )
    sampling: Literal["top", "random"] = Field(
        default="top", description="Which eligible candidates to keep: the highest-scoring, or drawn at random (seeded)."
    )
    refresh_every_steps: int | None = Field(
        default=None,
        gt=0,
        description="Re-mine with the current adapted model every N optimizer steps; used from the next epoch. null = step 0 only.",
    )
    negatives_per_anchor_in_batch: int = Field(
        default=2,
        ge=0,
        description="Mined negatives the batch sampler places in each anchor's global batch (0 = mine but keep the base order).",
    )

    @model_validator(mode="after")
    def window_holds_negatives(self) -> "MiningConfig":
        if self.rank_min > self.rank_max:
            raise ValueError(f"mining.rank_min ({self.rank_min}) must be <= mining.rank_max ({self.rank_max})")
        return self


class RecipeConfig(Section):
    model: ModelConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    data: DataConfig
    loss: LossConfig = Field(default_factory=LossConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    # A dict, not TrainConfig(): the default is invalid (no max_steps/epochs), and validating it here
    # reports that as `train: ...` next to every other problem instead of aborting the whole recipe.
    train: TrainConfig = Field(default_factory=dict)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    distill: DistillConfig | None = Field(
        default=None, description="Stage 1 before contrastive training: distil the original text tower into model.text_tower."
    )
    mining: MiningConfig = Field(default_factory=MiningConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)

    @model_validator(mode="after")
    def zero_steps_only_after_distillation(self) -> "RecipeConfig":
        if self.train.max_steps == 0 and self.distill is None:
            raise ValueError("train.max_steps: 0 skips the contrastive stage, which only makes sense after distill (stage 1)")
        return self

    @model_validator(mode="after")
    def distill_needs_text_tower(self) -> "RecipeConfig":
        if self.distill is not None and self.model.text_tower is None:
            raise ValueError("distill needs model.text_tower: the student is that encoder, the teacher model.name_or_path's own text tower")
        return self

    @model_validator(mode="after")
    def some_tower_trains(self) -> "RecipeConfig":
        if not (self.lora.vision.enabled or self.lora.text.enabled):
            raise ValueError("lora.vision.enabled and lora.text.enabled are both false: nothing would be adapted")
        return self

    @model_validator(mode="after")
    def export_metric_is_measured(self) -> "RecipeConfig":
        k = int(self.export.select_metric[2:])
        if k not in self.eval.ks:
            raise ValueError(f"export.select_metric: {self.export.select_metric} is not measured; eval.ks is {self.eval.ks}")
        return self

    @model_validator(mode="after")
    def label_features_need_labels(self) -> "RecipeConfig":
        train = self.data.train
        if train.label_column is not None:
            return self
        needs = []
        if self.sampling.kind != "uniform":
            needs.append(f"sampling.kind={self.sampling.kind}")
        if self.loss.class_weights != "none":
            needs.append(f"loss.class_weights={self.loss.class_weights}")
        if not self.loss.same_label_negatives:
            needs.append("loss.same_label_negatives=false")
        if needs:
            raise ValueError(f"{', '.join(needs)} need class labels: set data.train.label_column (e.g. label)")
        return self

    @model_validator(mode="after")
    def mined_negatives_fit_a_batch(self) -> "RecipeConfig":
        if self.mining.enabled and self.mining.negatives_per_anchor_in_batch >= self.train.batch_size:
            raise ValueError(
                f"mining.negatives_per_anchor_in_batch ({self.mining.negatives_per_anchor_in_batch}) must be < train.batch_size "
                f"({self.train.batch_size}): an anchor and its negatives share one batch"
            )
        return self

    @model_validator(mode="after")
    def warn_unused_logit_scale(self) -> "RecipeConfig":
        if self.model.train_logit_scale and not any(t.name in CLIP_TEMPERATURE_TERMS for t in self.loss.terms):
            warnings.warn(
                "model.train_logit_scale is true but no term in loss.terms reads CLIP's temperature "
                f"(only {' and '.join(CLIP_TEMPERATURE_TERMS)} do; siglip learns its own): it will not move",
                stacklevel=2,
            )
        return self

    @model_validator(mode="after")
    def caption_templates_need_captions(self) -> "RecipeConfig":
        if self.augment.text.caption_templates and self.data.train.caption_column is None:
            raise ValueError(
                "augment.text.caption_templates wrap existing captions, but data.train.caption_column is null (label-only: "
                "its captions are already drawn from data.train.caption_templates each epoch); add the wording there instead"
            )
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
        if not self.mining.enabled and self.mining.refresh_every_steps is not None:
            warnings.warn("mining.enabled is false: mining.refresh_every_steps ignored (training mines nothing)", stacklevel=2)
        if self.train.gradient_accumulation_steps > 1:
            warnings.warn(
                "train.gradient_accumulation_steps > 1 averages gradients but each contrastive loss still sees "
                f"only train.batch_size={self.train.batch_size} x processes negatives; for more negatives in the "
                "same memory raise train.batch_size and set train.micro_batch_size",
                stacklevel=2,
            )
        return self


# --------------------------------------------------------------------------- loading
