"""Lower-precision copies of a merged model, measured side by side with fp32, behind a quality gate.

Candidates (`DTYPES`):
  fp32, fp16, bf16  weights cast with `.to(dtype)`; saved in that dtype (plain `from_pretrained` loads them).
  int8              CPU inference: every Linear of both towers quantized dynamically (int8 weights, per-row
                    scales; activations quantized per batch) with `torch.ao.quantization.quantize_dynamic`.
                    The export folder keeps fp32 safetensors (so plain `from_pretrained` still works and
                    nothing is pickled); `load_export` quantizes at load, which is deterministic.

Why torch's dynamic quantization for int8 (measured on the demo model, see the README's export
section): torchao's `Int8DynamicActivationInt8WeightConfig` also ran, but was slower than fp32 on this CPU
for these small layers, and importing it made every PEFT import print library-load failures;
ONNX Runtime through optimum would add an ONNX export step and two more runtimes to ship. torch marks
`torch.ao.quantization` deprecated, so its warnings are silenced here and the choice is re-measured by
`scripts/benchmark_quantize.py`.

The gate: `quality_gate` compares target-set R@1 of the candidate with the fp32 merged model and
raises `QualityGateError` when either direction drops more than `export.max_r1_drop` points.
"""

from __future__ import annotations

import copy
import io
import statistics
import warnings

import torch
from torch import nn

from finetune.errors import QualityGateError
from finetune.export import DTYPES
from finetune.timing import side_by_side

_TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def quantize(model: nn.Module, dtype: str) -> nn.Module:
    """A copy of `model` in `dtype` (one of DTYPES), in eval mode; `model` is left as it was."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    model = copy.deepcopy(model).eval()
    if dtype in _TORCH_DTYPES:
        return model.to(_TORCH_DTYPES[dtype])
    return quantize_int8_dynamic(model)


def quantize_int8_dynamic(model: nn.Module) -> nn.Module:
    """Every nn.Linear -> dynamically quantized int8 Linear, in place (CPU inference only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices, once per call
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        # Per output channel scales: one outlier row no longer flattens a whole matrix to zero.
        return quantize_dynamic(model.float(), {nn.Linear: per_channel_dynamic_qconfig}, inplace=True)


def state_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict serialized (quantized weights packed as torch stores them)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.save(model.state_dict(), buffer)
    return buffer.tell()


@torch.no_grad()
def embedding_throughput(
    models: dict[str, nn.Module],
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    repeats: int = 5,
) -> dict[str, dict[str, float]]:
    """Images/s and captions/s per model, measured side by side: the models take turns in every repeat,
    so a neighbour's load on a shared machine hits all of them alike. Medians of `repeats` timings.
    """
    from finetune.models.towers import image_features, text_features

    fns = {}
    for name, model in models.items():
        fns[f"{name}/image"] = lambda m=model: image_features(m, pixel_values)
        fns[f"{name}/text"] = lambda m=model: text_features(m, input_ids, attention_mask)
    times = side_by_side(fns, repeats=repeats)
    timings = {name: {"image": times[f"{name}/image"], "text": times[f"{name}/text"]} for name in models}
    return {
        name: {
            "images_per_s": len(pixel_values) / statistics.median(t["image"]),
            "captions_per_s": len(input_ids) / statistics.median(t["text"]),
        }
        for name, t in timings.items()
    }


def r1_drops(reference: dict, candidate: dict, eval_set: str = "target") -> dict[str, float]:
    """{direction: reference R@1 - candidate R@1} in points (positive = the candidate is worse), for the
    retrieval directions (a labelled set's results also hold class-level rows, which have no R@1)."""
    return {
        direction: float(reference[eval_set][direction]["R@1"]) - float(candidate[eval_set][direction]["R@1"])
        for direction in ("t2i", "i2t")
        if direction in reference[eval_set]
    }


def quality_gate(reference: dict, candidate: dict, *, dtype: str, max_r1_drop: float) -> dict[str, float]:
    """Per-direction R@1 drops; raises QualityGateError when any exceeds `max_r1_drop` points."""
    drops = r1_drops(reference, candidate)
    failed = {d: v for d, v in drops.items() if v > max_r1_drop}
    if failed:
        detail = ", ".join(
            f"{d} R@1 {reference['target'][d]['R@1']:.2f} -> {candidate['target'][d]['R@1']:.2f} (-{v:.2f})" for d, v in failed.items()
        )
        raise QualityGateError(
            f"quality gate: the {dtype} export loses more target R@1 than export.max_r1_drop={max_r1_drop} points "
            f"allows: {detail}. Nothing was written; export fp32 (or another --dtype), or raise export.max_r1_drop "
            "if that loss is acceptable."
        )
    return drops
