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
    """Symmetric InfoNCE with CLIP's learned temperature.

    Rows that are captions of the same image (same `batch["image_index"]`) are masked out of each
    other's denominators: two captions of one picture are never negatives of each other.
    """

    def __init__(self, max_logit_scale: float = 100.0):
        super().__init__()
        # CLIP clamps exp(logit_scale) at 100 so the temperature cannot collapse.
        self.max_log_scale = math.log(max_logit_scale)

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = features.image, features.text  # (N, D) each
        image_index = batch["image_index"]  # (N,)
        scale = features.logit_scale.float().clamp(max=self.max_log_scale).exp()
        logits = scale * image @ text.T  # (N, N) image rows, caption columns

        same_image = image_index[:, None] == image_index[None, :]  # (N, N)
        not_self = ~torch.eye(len(image_index), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same_image & not_self, float("-inf"))
        targets = torch.arange(len(image_index), device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        return {"contrastive": loss}
