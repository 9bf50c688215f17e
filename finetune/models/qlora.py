"""QLoRA for image-text models: load the frozen base quantized through bitsandbytes (8-bit or 4-bit
NF4/FP4, optional double quantization), prepare it for k-bit training, and train LoRA on top.

bitsandbytes has a CPU backend (used here) and CUDA kernels (used when a GPU is present). Only the
towers' Linear layers are quantized: the projections into the shared space stay in full precision
(small, and `model.train_projections` trains them), embeddings and layer norms are never quantized.
The adapter is an ordinary PEFT adapter: it loads onto the full-precision base with plain PEFT, and a
merge for export goes into the full-precision base, never into the quantized weights (merging into a
4-bit base would round the update away and quantize the result again).
"""

from __future__ import annotations

import torch
from transformers import BitsAndBytesConfig

from finetune.models.towers import TOWERS, model_layout

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bnb_quantization_config(
    quantization: str, quant_type: str, double_quant: bool, compute_dtype: str, keep_full_precision: list[str]
) -> BitsAndBytesConfig | None:
    """The `quantization_config` for `from_pretrained`; None for `none`."""
    if quantization == "none":
        return None
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=keep_full_precision)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=COMPUTE_DTYPES[compute_dtype],
        llm_int8_skip_modules=keep_full_precision,  # bitsandbytes' one skip list, for 4-bit too
    )


def full_precision_modules(config) -> list[str]:
    """Modules kept out of quantization: the projections into the shared embedding space."""
    layout = model_layout(config)
    return [layout.towers[t].projection for t in TOWERS]


def prepare_quantized_for_training(model):
    """Freeze the quantized base and upcast its remaining half-precision tensors (layer norms) to
    fp32, as PEFT's QLoRA recipe does. Gradient checkpointing stays the recipe's choice."""
    from peft import prepare_model_for_kbit_training

    release_checkpoint_mapping(model)
    keep_4bit_weights_trainable(model)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def keep_4bit_weights_trainable(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, a Linear4bit's first forward without gradients (the zero-shot eval, the
    baselines) repacks its weight for a gemv kernel that has no backward, and later training forwards
    keep using it: the first step fails with "a view of a leaf Variable ... in-place operation". A
    training run keeps the plain layout, so its evals run through the same dequantize + matmul as its steps.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def release_checkpoint_mapping(model) -> None:
    """Copy the tensors bitsandbytes did not quantize (embeddings, layer norms, biases, skipped modules)
    out of the checkpoint file.

    from_pretrained leaves them as views of the memory-mapped safetensors file, and one live view keeps
    the whole mapping, so every page of the full-precision checkpoint read while quantizing stays
    resident: on CLIP ViT-B/32 ~480 MB of file-backed memory beside a 4-bit model (measured with
    scripts/benchmark.py's memory probe). The copies hold only what is really full precision.
    """
    import gc

    import bitsandbytes as bnb

    quantized = (bnb.nn.Params4bit, bnb.nn.Int8Params)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not isinstance(param, quantized):
                param.data = param.data.clone()
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    gc.collect()  # drop the last references to the mapping now, not at some later collection


def is_quantized(model) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))
