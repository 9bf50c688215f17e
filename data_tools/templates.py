"""Captions from class labels: label-only datasets (an image and a class, no caption) become image-caption
pairs through templates such as "an EL image of a {label} solar cell".

Every template is filled with the label's words (`label_names` maps raw labels such as "0" to words;
unmapped labels stay as they are). A loaded row keeps all filled templates (`caption_choices`);
training draws one per sample per epoch with `pick_template(seed, epoch, source_row)`, a pure
function, so the captions an epoch sees are the same after a resume. The same templates are the class
prompts of label-aware evaluation (finetune/evaluation/evaluate.py: a mean of normalised template embeddings).
"""

from __future__ import annotations

import numpy as np
from torch.utils.data import Dataset


def label_words(label: str, label_names: dict[str, str] | None) -> str:
    return (label_names or {}).get(str(label), str(label))


def label_captions(label: str, templates: list[str], label_names: dict[str, str] | None) -> list[str]:
    """Every template filled with the label's words."""
    words = label_words(label, label_names)
    return [template.format(label=words) for template in templates]


def pick_template(seed: int, epoch: int, source_row: int, num_templates: int) -> int:
    """The template a sample uses in an epoch: deterministic in (seed, epoch, source_row)."""
    if num_templates == 1:
        return 0
    return int(np.random.default_rng([seed, epoch, source_row]).integers(num_templates))


class EpochCaptions(Dataset):
    """Training rows whose label-only samples draw a fresh template each epoch; other rows pass through.

    The loop assigns `epoch` before each pass (as it does for the sampler); DataLoader workers are
    started per pass, so they see the new value.
    """

    def __init__(self, pairs, seed: int):
        self.pairs, self.seed, self.epoch = pairs, seed, 0

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        row = self.pairs[int(i)]
        choices = row.get("caption_choices")
        if choices:
            row["caption"] = choices[pick_template(self.seed, self.epoch, int(row["source_row"]), len(choices))]
        return row
