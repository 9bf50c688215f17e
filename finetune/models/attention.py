"""Each tower's attention kernel: eager or SDPA, chosen from model.attn_implementation and what the run is on."""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from finetune.models.towers import unwrap


def tower_tokens(config: PretrainedConfig, *, image_size: int | None, max_text_length: int) -> dict[str, int]:
    """Longest sequence each tower attends over: image patches + [CLS], and the caption token limit."""
    vision = config.vision_config
    side = (image_size or vision.image_size) // vision.patch_size
    return {"vision": side * side + 1, "text": max_text_length}


def choose_attention(requested: str, *, on_cpu: bool, mixed_precision: str, tokens: dict[str, int]) -> dict[str, str]:
    """Attention implementation per tower ("sdpa" or "eager"). `requested` auto: eager for a tower of at
    most EAGER_MAX_TOKENS_CPU_BF16 tokens when training on a CPU in bf16, sdpa everywhere else."""
    if requested != "auto":
        return {tower: requested for tower in tokens}
    cpu_bf16 = on_cpu and mixed_precision == "bf16"
    return {tower: "eager" if cpu_bf16 and n <= EAGER_MAX_TOKENS_CPU_BF16 else "sdpa" for tower, n in tokens.items()}


def set_attention(model: nn.Module, per_tower: dict[str, str]) -> None:
    """Switch each tower's attention kernel in place (same weights, same math)."""
    unwrap(model).set_attn_implementation({f"{tower}_config": impl for tower, impl in per_tower.items()})


def apply_attention(
    model: nn.Module, requested: str, *, on_cpu: bool, mixed_precision: str, image_size: int | None, max_text_length: int
) -> tuple[dict[str, str], dict[str, int]]:
    """Choose (`choose_attention`) and set each tower's kernel for a training run; returns (choice, tokens)."""
    tokens = tower_tokens(unwrap(model).config, image_size=image_size, max_text_length=max_text_length)
    attention = choose_attention(requested, on_cpu=on_cpu, mixed_precision=mixed_precision, tokens=tokens)
    set_attention(model, attention)
    return attention, tokens


# PyTorch's fused attention (sdpa) on a CPU under bf16 autocast: its backward costs ~10 ms per layer call
# even for a few dozen tokens, where eager attention (two batched matmuls and a softmax) costs ~2 ms; the
# fused kernel pulls ahead from ~200-250 tokens (`attention_kernels` in scripts/benchmark.py: batch 8, 12
# heads of 64, forward + backward, eager vs sdpa: 4.1x faster at 50 tokens, 1.2x at 197, 0.71x at 257).
EAGER_MAX_TOKENS_CPU_BF16 = 200
