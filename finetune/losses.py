"""Contrastive losses. Each loss is an nn.Module returning a dict of named terms; the loop sums them.

On the contrastive batch: the negatives of a pair are the other pairs in the *global* batch, i.e.
`train.batch_size x processes` when features are gathered across processes. Gradient accumulation
averages gradients over micro-batches but adds no negatives.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 (sizes may differ per rank) that sends gradients back to their owner.

    Every rank computes the same full loss on the gathered batch, so the gradient reaching rank r's
    slice is the sum over ranks of identical copies: all_reduce then keep our slice, and DDP's
    average over ranks yields exactly the full-batch gradient. all_reduce works on gloo and NCCL.
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        size = torch.tensor([local.shape[0]], device=local.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s.item()) for s in sizes]
        longest = max(sizes)
        padded = local.new_zeros((longest, *local.shape[1:]))
        padded[: local.shape[0]] = local
        chunks = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(chunks, padded.contiguous())
        rank = dist.get_rank()
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
        return torch.cat([chunk[:n] for chunk, n in zip(chunks, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.start : ctx.stop]


def gather_with_grad(local: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local
    return _GatherWithGrad.apply(local)


class ClipInfoNCE(nn.Module):
    """Symmetric InfoNCE with CLIP's learned temperature.

    Rows that are captions of the same image (same `image_index`) are masked out of each other's
    denominators: two captions of one picture are never negatives of each other.
    """

    def __init__(self, gather_across_processes: bool = True, max_logit_scale: float = 100.0):
        super().__init__()
        self.gather_across_processes = gather_across_processes
        # CLIP clamps exp(logit_scale) at 100 so the temperature cannot collapse.
        self.max_log_scale = math.log(max_logit_scale)

    def forward(
        self,
        image_features: torch.Tensor,  # (B, D)
        text_features: torch.Tensor,  # (B, D)
        logit_scale: torch.Tensor,  # () log of the inverse temperature
        image_index: torch.Tensor,  # (B,) which image each pair shows
    ) -> dict[str, torch.Tensor]:
        image_features = F.normalize(image_features.float(), dim=-1)
        text_features = F.normalize(text_features.float(), dim=-1)
        if self.gather_across_processes:
            image_features = gather_with_grad(image_features)  # (N, D), N = global batch
            text_features = gather_with_grad(text_features)
            image_index = gather_with_grad(image_index)  # integer: no gradient flows, just the values
        scale = logit_scale.float().clamp(max=self.max_log_scale).exp()
        logits = scale * image_features @ text_features.T  # (N, N) image rows, caption columns

        same_image = image_index[:, None] == image_index[None, :]  # (N, N)
        not_self = ~torch.eye(len(image_index), dtype=torch.bool, device=logits.device)
        logits = logits.masked_fill(same_image & not_self, float("-inf"))
        targets = torch.arange(len(image_index), device=logits.device)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        return {"contrastive": loss}
