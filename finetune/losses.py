"""Contrastive losses. A loss is an `nn.Module` called as `loss(features, batch)` that returns a dict of
named terms; the loop sums and logs them, so a new term never touches the loop.

`features` (a `Features`) holds what the step computed and already gathered across processes:
L2-normalised image and text embeddings, the log logit scale, and any extra outputs. `batch` holds the
gathered per-pair tensors of the collated batch (`image_index`, `source_row`, and whatever a sampler
adds). A loss with parameters of its own (a learned bias) registers them as usual; the trainer gives
them to the optimizer and stores them in checkpoints.

On the contrastive batch: the negatives of a pair are the other pairs in the *global* batch, i.e.
`train.batch_size x processes` when features are gathered across processes. Gradient accumulation
averages gradients over micro-batches but adds no negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Features:
    image: torch.Tensor  # (N, D) L2-normalised, float32; N = global batch when gathered
    text: torch.Tensor  # (N, D) L2-normalised, float32; row i is a caption of image row i
    logit_scale: torch.Tensor  # () log of the inverse temperature
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class ClipInfoNCE(nn.Module):
    """Symmetric InfoNCE with CLIP's learned temperature, optionally label-aware.

    Rows that are captions of the same image (same `batch["image_index"]`) are masked out of each
    other's denominators: two captions of one picture are never negatives of each other.

    Labels (`batch["label_id"]`, int64, -1 for an unlabelled row) enable two options:

    * `same_label_negatives=False`: pairs of the same class are masked out of each other's
      denominators too (the supervised-contrastive view: another "circle" is not a wrong answer).
    * `class_weights` (C,): pair i's two cross-entropy terms are multiplied by the weight of its
      class (1 for unlabelled rows), and the loss is the plain mean over pairs of the weighted terms:
      L = 1/2 [ 1/N sum_i w_i CE_i(image->text) + 1/N sum_i w_i CE_i(text->image) ].
      With weights normalised to mean 1 over the data (data_tools/class_weights.py) the loss keeps
      its scale on average.

    `negatives_per_pair()` reports how many negatives a pair really had after masking, averaged
    over every pair this module has seen (for the model card).
    """

    def __init__(
        self, max_logit_scale: float = 100.0, *, same_label_negatives: bool = True, class_weights: torch.Tensor | None = None
    ):
        super().__init__()
        # CLIP clamps exp(logit_scale) at 100 so the temperature cannot collapse.
        self.max_log_scale = math.log(max_logit_scale)
        self.same_label_negatives = same_label_negatives
        # Not a parameter, not trained; a buffer so it follows the module to the device.
        self.register_buffer(
            "class_weights", None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )
        self._negatives, self._pairs = 0, 0  # running totals for negatives_per_pair()

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = features.image, features.text  # (N, D) each
        image_index = batch["image_index"]  # (N,)
        n = len(image_index)
        scale = features.logit_scale.float().clamp(max=self.max_log_scale).exp()
        logits = scale * image @ text.T  # (N, N) image rows, caption columns

        not_self = ~torch.eye(n, dtype=torch.bool, device=logits.device)  # (N, N)
        masked = image_index[:, None] == image_index[None, :]  # (N, N) same image
        label_id = batch.get("label_id")  # (N,) or None
        if not self.same_label_negatives:
            if label_id is None:
                raise ValueError("loss.same_label_negatives: false needs labels (batch['label_id']); set the train set's label_column")
            labelled = label_id >= 0  # (N,)
            masked = masked | ((label_id[:, None] == label_id[None, :]) & labelled[:, None] & labelled[None, :])
        masked = masked & not_self
        logits = logits.masked_fill(masked, float("-inf"))
        with torch.no_grad():
            self._negatives += int((~masked & not_self).sum())
            self._pairs += n

        targets = torch.arange(n, device=logits.device)
        per_image = F.cross_entropy(logits, targets, reduction="none")  # (N,) image -> caption
        per_text = F.cross_entropy(logits.T, targets, reduction="none")  # (N,) caption -> image
        if self.class_weights is None:
            return {"contrastive": 0.5 * (per_image.mean() + per_text.mean())}
        if label_id is None:
            raise ValueError("loss.class_weights needs labels (batch['label_id']); set the train set's label_column")
        ones = torch.ones_like(per_image)
        weight = torch.where(label_id >= 0, self.class_weights[label_id.clamp(min=0)], ones)  # (N,)
        return {"contrastive": 0.5 * ((weight * per_image).mean() + (weight * per_text).mean())}

    def negatives_per_pair(self) -> float | None:
        """Mean number of in-batch negatives a pair had after same-image (and same-label) masking."""
        return self._negatives / self._pairs if self._pairs else None
