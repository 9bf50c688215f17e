"""Contrastive losses. A loss is an `nn.Module` called as `loss(features, batch)` that returns a dict of
named terms; the loop sums and logs them, so a new term never touches the loop.

`features` (a `Features`) holds what the step computed and already gathered across processes:
L2-normalised image and text embeddings, the log logit scale, and any extra outputs. `batch` holds the
gathered per-pair tensors of the collated batch (`image_index`, `source_row`, and whatever a sampler
adds). A loss with parameters of its own (a learned bias) registers them as usual; the trainer gives
them to the optimizer and stores them in checkpoints.

On the contrastive batch: the negatives of a pair are the other pairs in the *global* batch, i.e.
`train.batch_size x processes` when features are gathered across processes. Gradient accumulation
averages gradients over micro-batches but adds no negatives. Mined hard negatives reach a loss as
ordinary rows of the batch.

Every pairwise term takes its negatives from one helper, `negatives_mask`: captions of the same image
are never negatives of each other, nor (with `same_label_negatives=False`) pairs of one class. The
recipe's `loss.terms` list becomes a `CompositeLoss` (finetune/train.py `build_loss`): each term's
weighted value is returned under the term's name, and the loop sums them, so the logged terms add up
to the loss backward sees.
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


def negatives_mask(batch: dict[str, torch.Tensor], *, same_label_negatives: bool) -> torch.Tensor:
    """(N, N) bool, True where caption j is a negative of image i (and image i one of caption j).

    Excluded: the pair itself (the diagonal), captions of the same image (`batch["image_index"]`), and,
    when `same_label_negatives` is False, pairs sharing a class (`batch["label_id"]` >= 0; -1 is an
    unlabelled row, never matched). The mask is symmetric, so every term reads rows (image anchors)
    and columns (caption anchors) from the same matrix.
    """
    image_index = batch["image_index"]  # (N,)
    n = len(image_index)
    same = image_index[:, None] == image_index[None, :]  # (N, N) same image (includes the diagonal)
    if not same_label_negatives:
        label_id = batch.get("label_id")  # (N,) or None
        if label_id is None:
            raise ValueError("loss.same_label_negatives: false needs labels (batch['label_id']); set the train set's label_column")
        labelled = label_id >= 0  # (N,)
        same = same | ((label_id[:, None] == label_id[None, :]) & labelled[:, None] & labelled[None, :])
    not_self = ~torch.eye(n, dtype=torch.bool, device=image_index.device)  # (N, N)
    return ~same & not_self


def pair_class_weights(batch: dict[str, torch.Tensor], class_weights: torch.Tensor | None) -> torch.Tensor | None:
    """(N,) weight of each pair's class (1 for unlabelled rows), or None without class weights."""
    if class_weights is None:
        return None
    label_id = batch.get("label_id")  # (N,) or None
    if label_id is None:
        raise ValueError("loss.class_weights needs labels (batch['label_id']); set the train set's label_column")
    return torch.where(label_id >= 0, class_weights[label_id.clamp(min=0)], torch.ones_like(label_id, dtype=class_weights.dtype))


def _weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if weight is None else (weight * values).mean()


def _clip_scale(features: Features, max_log_scale: float) -> torch.Tensor:
    """CLIP's inverse temperature, clamped as CLIP clamps it (exp(logit_scale) <= 100)."""
    return features.logit_scale.float().clamp(max=max_log_scale).exp()


class ClipInfoNCE(nn.Module):
    """Symmetric InfoNCE with CLIP's learned temperature, optionally label-aware (recipe term `infonce`).

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

    def __init__(self, max_logit_scale: float = 100.0, *, same_label_negatives: bool = True, class_weights: torch.Tensor | None = None):
        super().__init__()
        # CLIP clamps exp(logit_scale) at 100 so the temperature cannot collapse.
        self.max_log_scale = math.log(max_logit_scale)
        self.same_label_negatives = same_label_negatives
        # Not a parameter, not trained; a buffer so it follows the module to the device.
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )
        self._negatives, self._pairs = 0, 0  # running totals for negatives_per_pair()

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = features.image, features.text  # (N, D) each
        n = len(image)
        logits = _clip_scale(features, self.max_log_scale) * image @ text.T  # (N, N) image rows, caption columns
        negative = negatives_mask(batch, same_label_negatives=self.same_label_negatives)  # (N, N)
        not_self = ~torch.eye(n, dtype=torch.bool, device=logits.device)  # (N, N)
        logits = logits.masked_fill(~negative & not_self, float("-inf"))  # the positive stays, masked rows go
        with torch.no_grad():
            self._negatives += int(negative.sum())
            self._pairs += n

        targets = torch.arange(n, device=logits.device)
        per_image = F.cross_entropy(logits, targets, reduction="none")  # (N,) image -> caption
        per_text = F.cross_entropy(logits.T, targets, reduction="none")  # (N,) caption -> image
        weight = pair_class_weights(batch, self.class_weights)  # (N,) or None
        return {"contrastive": 0.5 * (_weighted_mean(per_image, weight) + _weighted_mean(per_text, weight))}

    def negatives_per_pair(self) -> float | None:
        """Mean number of in-batch negatives a pair had after same-image (and same-label) masking."""
        return self._negatives / self._pairs if self._pairs else None


class HardnessWeightedInfoNCE(nn.Module):
    """InfoNCE whose negatives are re-weighted by their hardness (recipe term `hn_infonce`).

    HN-NCE (Radenovic et al. 2023), the importance weighting of Robinson et al. 2021: with logits
    l_ij = s_ij / tau (CLIP's temperature, as `infonce`), negative j of anchor i enters the denominator
    with weight
        w_ij = n_i * exp(beta * l_ij) / sum_{k negative of i} exp(beta * l_ik),   n_i = #negatives of i,
    so the weights average 1 over an anchor's negatives and the hardest ones count most:
        L_i = -log( exp(l_ii) / (exp(l_ii) + sum_j w_ij exp(l_ij)) ),  both directions, mean, 1/2 each.
    Computed in log space (log w_ij is added to l_ij); beta = 0 gives log w_ij = log n_i - log n_i = 0
    exactly, i.e. `infonce`. The weights are not detached (as in both papers' formulation). Class
    weights multiply each pair's two terms as in `infonce`.
    """

    def __init__(self, beta: float, *, max_logit_scale: float, same_label_negatives: bool, class_weights: torch.Tensor | None):
        super().__init__()
        self.beta = beta
        self.max_log_scale = math.log(max_logit_scale)
        self.same_label_negatives = same_label_negatives
        self.register_buffer(
            "class_weights",
            None if class_weights is None else torch.as_tensor(class_weights, dtype=torch.float32),
            persistent=False,
        )

    def _weighted_logits(self, logits: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
        """(N, N) logits of anchors (rows) with log w_ij added to each negative, -inf where masked.

        With beta = 0 this is bit for bit `infonce`'s masked matrix (log w_ij = 0.0 exactly)."""
        n = len(logits)
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        has_negative = negative.any(dim=1, keepdim=True)  # (N, 1)
        count = negative.sum(dim=1, keepdim=True).clamp(min=1).to(logits.dtype)  # (N, 1) n_i
        hard = (self.beta * logits).masked_fill(~negative, float("-inf"))  # (N, N)
        # An anchor without negatives gets a finite (unused) normaliser, so no NaN reaches the gradient.
        norm = torch.logsumexp(torch.where(has_negative, hard, torch.zeros_like(hard)), dim=1, keepdim=True)  # (N, 1)
        log_w = torch.log(count) + hard - norm  # (N, N), meaningful on negatives only
        return torch.where(negative, logits + log_w, logits.masked_fill(~eye, float("-inf")))

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits = _clip_scale(features, self.max_log_scale) * features.image @ features.text.T  # (N, N)
        negative = negatives_mask(batch, same_label_negatives=self.same_label_negatives)  # (N, N) symmetric
        targets = torch.arange(len(logits), device=logits.device)
        per_image = F.cross_entropy(self._weighted_logits(logits, negative), targets, reduction="none")  # (N,)
        per_text = F.cross_entropy(self._weighted_logits(logits.T, negative.T), targets, reduction="none")  # (N,)
        weight = pair_class_weights(batch, self.class_weights)
        return {"hn_infonce": 0.5 * (_weighted_mean(per_image, weight) + _weighted_mean(per_text, weight))}


class SigLIPLoss(nn.Module):
    """Pairwise sigmoid loss of SigLIP (Zhai et al. 2023), recipe term `siglip`.

    Every (image i, caption j) is a binary problem, positive on the diagonal, negative elsewhere:
        L = -1/N sum_i sum_j log sigmoid( z_ij * (t * s_ij + b) ),   z_ii = 1, z_ij = -1 (j negative of i)
    with s the cosine similarity, t = exp(t') and b learned. Pairs masked by `negatives_mask` (another
    caption of the same image; same class when asked) are left out of the sum: neither positive nor
    negative. The 1/N (not 1/N^2) normalisation is the paper's.

    Temperature: SigLIP's own, not CLIP's `logit_scale`. Its bias b is what makes the sigmoid work
    (with b = 0 almost every logit sits on the negative side's slope), and t and b are learned together
    from the paper's initialisation t' = log(temperature_init) = log 10, b = bias_init = -10.
    `model.train_logit_scale` therefore does not touch this term; t' and b are always trained (they
    are this module's parameters: in the optimizer without weight decay, in every checkpoint).
    Class weights are ignored.
    """

    def __init__(self, temperature_init: float, bias_init: float, *, same_label_negatives: bool):
        super().__init__()
        self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature_init)))  # t'
        self.bias = nn.Parameter(torch.tensor(float(bias_init)))  # b
        self.same_label_negatives = same_label_negatives

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image, text = features.image, features.text  # (N, D) each
        n = len(image)
        logits = self.log_temperature.exp() * (image @ text.T) + self.bias  # (N, N)
        negative = negatives_mask(batch, same_label_negatives=self.same_label_negatives)  # (N, N)
        eye = torch.eye(n, dtype=torch.bool, device=logits.device)
        sign = torch.where(eye, 1.0, -1.0).to(logits.dtype)  # (N, N) z_ij
        per_pair = -F.logsigmoid(sign * logits)  # (N, N)
        return {"siglip": per_pair.masked_fill(~(negative | eye), 0.0).sum() / n}


def _hinge(margin: float, positive: torch.Tensor, negative_sim: torch.Tensor) -> torch.Tensor:
    """max(0, margin - s_pos + s_neg), broadcast: positive (N, 1), negative_sim (N, M)."""
    return (margin - positive + negative_sim).clamp(min=0)


class _CosineHinge(nn.Module):
    """What the hinge terms share: a margin on cosine similarity (no temperature) and the negatives mask."""

    def __init__(self, margin: float, *, same_label_negatives: bool):
        super().__init__()
        self.margin = margin
        self.same_label_negatives = same_label_negatives

    def cosines(self, features: Features, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sim (N, N) image rows x caption columns, negative (N, N) bool, positive (N, 1) = sim's diagonal."""
        sim = features.image @ features.text.T  # (N, N) cosine
        negative = negatives_mask(batch, same_label_negatives=self.same_label_negatives)  # (N, N)
        return sim, negative, sim.diagonal()[:, None]


class MaxViolationTriplet(_CosineHinge):
    """VSE++ max-violation triplet loss (Faghri et al. 2018), recipe term `vsepp`.

    For each pair, the hardest negative caption of its image and the hardest negative image of its
    caption, by cosine similarity s (no temperature):
        L = 1/N sum_i [ max(0, m - s_ii + max_j s_ij) + max(0, m - s_ii + max_j s_ji) ],  j negatives of i.
    The paper sums over the batch; the mean keeps the scale independent of the batch size. A pair with
    no negative left after masking contributes 0. Class weights are ignored.
    """

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sim, negative, positive = self.cosines(features, batch)  # (N, N), (N, N), (N, 1)
        losses = []
        for s in (sim, sim.T):  # image anchors (negative captions), caption anchors (negative images)
            hardest = s.masked_fill(~negative, float("-inf")).max(dim=1, keepdim=True).values  # (N, 1)
            losses.append(torch.where(torch.isfinite(hardest), _hinge(self.margin, positive, hardest), torch.zeros_like(hardest)))
        return {"vsepp": (losses[0] + losses[1]).mean()}


class SemiHardTriplet(_CosineHinge):
    """FaceNet-style semi-hard triplet loss (Schroff et al. 2015), recipe term `semihard`.

    For each anchor (an image, and separately a caption) the negative is the hardest one that is still
    farther than the positive: the largest s_ij with s_ij < s_ii (cosine similarity). Its hinge
    max(0, m - s_ii + s_ij) is non-zero only when it lies within the margin. Fallback when no negative
    is farther than the positive (every negative is already harder): the easiest negative, min_j s_ij,
    as TensorFlow Addons' triplet_semihard_loss does; its hinge is >= m, so the anchor keeps a
    gradient without being driven by its very hardest (possibly mislabelled) negative. An anchor with
    no negative after masking contributes 0.
        L = 1/N sum_i [ hinge(image i) + hinge(caption i) ].   Class weights are ignored.
    """

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sim, negative, positive = self.cosines(features, batch)  # (N, N), (N, N), (N, 1)
        losses = []
        for s in (sim, sim.T):
            farther = negative & (s < positive)  # (N, N) semi-hard candidates
            semi_hard = s.masked_fill(~farther, float("-inf")).max(dim=1, keepdim=True).values  # (N, 1)
            easiest = s.masked_fill(~negative, float("inf")).min(dim=1, keepdim=True).values  # (N, 1) fallback
            chosen = torch.where(farther.any(dim=1, keepdim=True), semi_hard, easiest)  # (N, 1)
            has_negative = negative.any(dim=1, keepdim=True)
            losses.append(torch.where(has_negative, _hinge(self.margin, positive, chosen.masked_fill(~has_negative, 0.0)), 0.0))
        return {"semihard": (losses[0] + losses[1]).mean()}


class MarginRanking(_CosineHinge):
    """Sum-of-hinges ranking loss over every negative, recipe term `margin_ranking`:
        L = 1/N sum_i [ sum_j max(0, m - s_ii + s_ij) + sum_j max(0, m - s_ii + s_ji) ],  j negatives of i,
    on cosine similarities (VSE's original loss, before VSE++ kept only the hardest negative).
    Class weights are ignored."""

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sim, negative, positive = self.cosines(features, batch)  # (N, N), (N, N), (N, 1)
        per_image = _hinge(self.margin, positive, sim).masked_fill(~negative, 0.0).sum(dim=1)  # (N,)
        per_text = _hinge(self.margin, positive, sim.T).masked_fill(~negative, 0.0).sum(dim=1)  # (N,)
        return {"margin_ranking": (per_image + per_text).mean()}


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by -scale (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.scale * grad, None


def reverse_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    return _ReverseGradient.apply(x, scale)


class ModalityAdversarial(nn.Module):
    """Modality-adversarial term (Wang et al. 2017, "Adversarial Cross-Modal Retrieval"), recipe term
    `adversarial`.

    A small MLP discriminator reads every embedding of the batch (N image rows, label 1; N caption
    rows, label 0) through a gradient reversal layer and is trained with binary cross-entropy:
        L = BCE(D(R(z)), modality), mean over the 2N rows.
    The discriminator's parameters descend L (it learns to tell the modalities apart); the reversal
    layer hands the towers -reversal x dL/dz, so they ascend L (they make the modalities
    indistinguishable). Not pairwise: no masking applies. Its accuracy on the batch is logged as
    `adversarial_accuracy` (0.5 = the towers win).

    The discriminator is initialised from `seed` without disturbing the global RNG (so adding the
    term changes no data order or dropout mask). Class weights are ignored.
    """

    def __init__(self, embed_dim: int, hidden_dim: int, reversal: float, *, seed: int):
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.discriminator = nn.Sequential(nn.Linear(embed_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, 1))
        self.reversal = reversal
        self.last_accuracy: float | None = None

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = torch.cat([features.image, features.text])  # (2N, D)
        n = len(features.image)
        modality = torch.cat([torch.ones(n), torch.zeros(n)]).to(z.device)  # (2N,) 1 = image
        logits = self.discriminator(reverse_gradient(z, self.reversal)).squeeze(-1)  # (2N,)
        with torch.no_grad():
            self.last_accuracy = float(((logits > 0).float() == modality).float().mean())
        return {"adversarial": F.binary_cross_entropy_with_logits(logits, modality)}

    def log_values(self) -> dict[str, float]:
        return {} if self.last_accuracy is None else {"adversarial_accuracy": self.last_accuracy}


class CompositeLoss(nn.Module):
    """The recipe's `loss.terms`: named modules with weights, returned as {name: weight x value}.

    The loop sums the returned terms, so what it logs adds up to the loss backward sees. Losses run in
    float32 even under mixed precision (Accelerate wraps a loss with parameters in autocast).
    `negatives_per_pair()` counts the negatives every pairwise term used (one mask, shared rules);
    `log_values()` collects the terms' detached extras (the discriminator's accuracy).
    """

    def __init__(self, terms: dict[str, tuple[nn.Module, float]], *, same_label_negatives: bool):
        super().__init__()
        if not terms:
            raise ValueError("loss.terms: at least one term is needed")
        self.terms = nn.ModuleDict({name: module for name, (module, _) in terms.items()})
        self.weights = {name: float(weight) for name, (_, weight) in terms.items()}
        self.same_label_negatives = same_label_negatives
        self._negatives, self._pairs = 0, 0

    def forward(self, features: Features, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.autocast(features.image.device.type, enabled=False):
            features = Features(
                image=features.image.float(), text=features.text.float(), logit_scale=features.logit_scale, extras=features.extras
            )
            with torch.no_grad():
                self._negatives += int(negatives_mask(batch, same_label_negatives=self.same_label_negatives).sum())
                self._pairs += len(features.image)
            out = {}
            for name, module in self.terms.items():
                (value,) = module(features, batch).values()
                out[name] = self.weights[name] * value
            return out

    def negatives_per_pair(self) -> float | None:
        """Mean number of in-batch negatives a pair had after same-image (and same-label) masking."""
        return self._negatives / self._pairs if self._pairs else None

    def log_values(self) -> dict[str, float]:
        values = {}
        for module in self.terms.values():
            if hasattr(module, "log_values"):
                values.update(module.log_values())
        return values
