"""The class prompts of label-aware evaluation: where each class's text comes from, decided once per run.

A labelled eval set is classified by comparing each image with one embedding per class, the mean of
that class's normalised prompt embeddings (finetune/evaluation/metrics.py: class_prompt_embedding).
Which texts those prompts are matters more than any other choice in the report: labels are often codes
(`2`, `mel`, `C34.1`, `NORMAL`), words the model never saw, and classifying against the bare code can
say adaptation did nothing when it went from chance to 80%+. In order of precedence:

    caption_templates (+ label_names)   the recipe's templates filled with the label's words
    label_names                          the label's words alone
    training captions                    the distinct captions of the class in data.train (labelled),
                                         up to MAX_PER_CLASS, drawn with the run's seed
    the set's own captions               when data.train has no captions of that class (or no labels)
    bare label                           nothing else is known; a warning names the keys to set when the
                                         labels look like codes

The choice is written to the run's eval/class_prompts.json, so the periodic eval, results.json/.md,
the per-class plot, the model card and `export`'s quality gate all classify against the same texts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.templates import label_captions

MAX_PER_CLASS = 32  # distinct caption prompts per class: the ensemble's mean settles well before this
FILE = "class_prompts.json"
SOURCES = {
    "caption_templates": "the recipe's caption_templates",
    "label_names": "the recipe's label_names",
    "train_captions": "captions of the class in data.train",
    "own_captions": "the set's own captions of the class",
    "bare_label": "the bare label",
}
_CODE = re.compile(r"^[A-Z0-9._\-/:]{1,12}$|^\d+([._\-]\d+)*$|^[a-z]{1,4}\d*$")


@dataclass
class ClassPrompts:
    """Prompt texts per class of one eval set, and where each class's prompts came from."""

    prompts: dict[str, list[str]]  # class -> its prompt texts (>= 1 each)
    sources: dict[str, str]  # class -> a key of SOURCES
    warning: str | None = None
    examples_per_class: int = field(default=2, repr=False)

    def describe(self, max_classes: int = 4) -> str:
        """One line: where the prompts came from (counts per source) and two prompts of the first classes."""
        counts: dict[str, int] = {}
        for source in self.sources.values():
            counts[source] = counts.get(source, 0) + 1
        origin = "; ".join(f"{SOURCES[s]} ({n} {'class' if n == 1 else 'classes'})" for s, n in counts.items())
        shown = ", ".join(
            f"{c}: " + " / ".join(repr(p) for p in ps[: self.examples_per_class]) for c, ps in list(self.prompts.items())[:max_classes]
        )
        more = f", ... ({len(self.prompts)} classes)" if len(self.prompts) > max_classes else ""
        return f"class prompts from {origin}; e.g. {shown}{more}"

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "sources": self.sources, "warning": self.warning}

    @classmethod
    def from_json(cls, data: dict) -> ClassPrompts:
        return cls(prompts={c: list(p) for c, p in data["prompts"].items()}, sources=dict(data["sources"]), warning=data.get("warning"))


def looks_like_codes(classes: list[str]) -> bool:
    """Most labels are short codes or numbers (`2`, `mel`, `C34.1`, `NORMAL`), not words a caption would use."""
    return bool(classes) and sum(bool(_CODE.match(c)) for c in classes) > len(classes) / 2


def _distinct_by_class(labels: list[str], captions: list[list[str]]) -> dict[str, list[str]]:
    """class -> its distinct caption texts, in first-seen order."""
    out: dict[str, dict[str, None]] = {}
    for label, texts in zip(labels, captions):
        bucket = out.setdefault(str(label), {})
        for text in texts:
            if text and text.strip():
                bucket.setdefault(text, None)
    return {c: list(texts) for c, texts in out.items()}


def _capped(texts: list[str], seed: int, limit: int) -> list[str]:
    """At most `limit` of `texts`, drawn with `seed` (kept in their original order)."""
    if len(texts) <= limit:
        return texts
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), size=limit, replace=False))
    return [texts[i] for i in keep]


def build_class_prompts(
    key: str,
    classes: list[str],
    *,
    caption_templates: list[str] | None,
    label_names: dict[str, str] | None,
    own_captions: dict[str, list[str]] | None,
    train_captions: dict[str, list[str]] | None,
    seed: int = 0,
    max_per_class: int = MAX_PER_CLASS,
) -> ClassPrompts:
    """The prompts of the eval set at recipe key `key` (`data.eval.target`, `data.eval.languages.de`), by the
    precedence above.

    Args:
        classes: the set's classes.
        own_captions / train_captions: class -> distinct caption texts (None: that source has none).
        seed: the run's train.seed, for the draw when a class has more than `max_per_class` captions.
    """
    prompts, sources = {}, {}
    for c in classes:
        if caption_templates:
            prompts[c], sources[c] = label_captions(c, caption_templates, label_names), "caption_templates"
        elif label_names and c in label_names:
            prompts[c], sources[c] = [label_names[c]], "label_names"
        elif train_captions and train_captions.get(c):
            prompts[c], sources[c] = _capped(train_captions[c], seed, max_per_class), "train_captions"
        elif own_captions and own_captions.get(c):
            prompts[c], sources[c] = _capped(own_captions[c], seed, max_per_class), "own_captions"
        else:
            prompts[c], sources[c] = [c], "bare_label"
    bare = [c for c in classes if sources[c] == "bare_label"]
    warning = None
    if bare and looks_like_codes(bare):
        warning = (
            f"{key}: {len(bare)} of {len(classes)} classes are classified against their bare labels "
            f"({', '.join(repr(c) for c in bare[:4])}{', ...' if len(bare) > 4 else ''}), which look like codes the model "
            f"never saw in a caption, and the set has no captions for them: set {key}.caption_templates "
            f"(e.g. ['a photo of a {{label}}']) and {key}.label_names (code -> words) for class-level numbers that mean something"
        )
    return ClassPrompts(prompts=prompts, sources=sources, warning=warning)


def class_captions(
    labels: list[str] | None, captions: list[str], caption_choices: list[list[str]] | None = None
) -> dict[str, list[str]] | None:
    """class -> distinct caption texts of a labelled table (a label-only row counts all its template fills)."""
    if labels is None:
        return None
    texts = caption_choices if caption_choices is not None else [[c] for c in captions]
    return _distinct_by_class(labels, texts)


def save_class_prompts(prompts: dict[str, ClassPrompts], path: str | Path) -> None:
    from finetune.io import atomic_write_text

    atomic_write_text(Path(path), json.dumps({name: p.to_json() for name, p in prompts.items()}, indent=2, ensure_ascii=False) + "\n")


def load_class_prompts(path: str | Path) -> dict[str, ClassPrompts] | None:
    """The run's saved prompts (None for a run written before they were saved)."""
    path = Path(path)
    if not path.is_file():
        return None
    return {name: ClassPrompts.from_json(data) for name, data in json.loads(path.read_text()).items()}


def prompts_for_sets(cfg, sets: dict, train_captions: dict[str, list[str]] | None) -> dict[str, ClassPrompts]:
    """{eval set name: ClassPrompts} for every labelled set in `sets` ({name: RetrievalSet}, named as
    results.json names them: target, source, a language code), from the recipe `cfg`'s eval specs."""
    from finetune.config.specs import dataset_specs, eval_set_name

    specs = dataset_specs(cfg, replay=False)
    keys = {eval_set_name(k): k for k in specs if k.startswith("data.eval.")}
    out = {}
    for name, rset in sets.items():
        if rset.labels is None:
            continue
        key = keys.get(name, f"data.eval.{name}")
        spec = specs.get(key)
        caption_labels = [rset.labels[int(i)] for i in rset.text_to_image]  # (N_txt,) the class of each caption's image
        out[name] = build_class_prompts(
            key,
            sorted(set(rset.labels)),
            caption_templates=spec.caption_templates if spec is not None else None,
            label_names=spec.label_names if spec is not None else None,
            own_captions=class_captions(caption_labels, rset.captions),
            train_captions=train_captions,
            seed=cfg.train.seed,
        )
    return out
