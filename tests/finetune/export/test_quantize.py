"""QLoRA on a tiny CLIP: the base loads in 4 and 8 bits through bitsandbytes (CPU backend), LoRA on top
trains (the loss falls), and the adapter loads onto the full-precision base with plain PEFT."""

from __future__ import annotations

import json
import warnings

import bitsandbytes as bnb
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from peft import PeftModel
from transformers import CLIPModel

from finetune import train
from finetune.config.load import validate_config
from finetune.models.load import load_model
from finetune.models.qlora import (
    bnb_quantization_config,
    full_precision_modules,
    is_quantized,
)


@pytest.fixture(scope="module")
def clip64_dir(tmp_path_factory):
    """Width 64: bitsandbytes' CPU 4-bit inference kernel works on blocks of 64 input features
    (every real CLIP width is a multiple of 64; the suite's width-32 model is not)."""
    from data_tools.synthetic.domains import all_caption_text
    from finetune.models.tiny_clip import build_tiny_clip, save_clip_folder

    model, processor = build_tiny_clip(all_caption_text(per_domain=150), vocab_size=40, width=64, layers=2)
    return save_clip_folder(model, processor, tmp_path_factory.mktemp("clip-64"))


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()  # a finished training loop leaves end_of_dataloader set for the next test


@pytest.mark.parametrize("kind, layer_class", [("4bit", bnb.nn.Linear4bit), ("8bit", bnb.nn.Linear8bitLt)])
def test_the_base_loads_quantized_except_the_projections(tiny_clip_dir, kind, layer_class):
    config = bnb_quantization_config(
        kind, "nf4", True, "float32", full_precision_modules(CLIPModel.config_class.from_pretrained(tiny_clip_dir))
    )
    model, _ = load_model(str(tiny_clip_dir), quantization_config=config, device="cpu")
    assert is_quantized(model)
    assert isinstance(model.vision_model.encoder.layers[0].self_attn.q_proj, layer_class)
    assert isinstance(model.text_model.encoder.layers[1].mlp.fc2, layer_class)
    assert type(model.visual_projection) is torch.nn.Linear and type(model.text_projection) is torch.nn.Linear


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_qlora_trains_and_the_adapter_loads_on_the_full_precision_base(clip64_dir, tmp_path, kind):
    tiny_clip_dir = clip64_dir
    out = tmp_path / kind
    overrides = [
        f"model.name_or_path={tiny_clip_dir}",
        f"model.quantization={kind}",
        f"train.output_dir={out}",
        "train.max_steps=8",
        "train.batch_size=16",
        "train.log_every_steps=1",
        "optim.lr=5e-3",
        "optim.warmup_steps=0",
        "optim.scheduler=constant",
        "data.train.synthetic.num_images=16",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source=null",
        "eval.zero_shot=false",
        "data.num_workers=0",
        "train.checkpoint_every_steps=null",
    ]
    assert train.main(["recipes/demo.yaml", *overrides]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [r["infonce"] for r in log if "infonce" in r]
    assert len(losses) == 8
    # one batch of 16 pairs seen 8 times: the adapters on the quantized base must fit it
    assert losses[-1] < losses[0] - 0.1, losses

    base = CLIPModel.from_pretrained(tiny_clip_dir)  # full precision
    adapted = PeftModel.from_pretrained(base, out / "adapter")
    lora_b = [p for n, p in adapted.named_parameters() if "lora_B" in n]
    assert lora_b and max(p.abs().max() for p in lora_b) > 0
    assert not is_quantized(adapted.get_base_model())


def test_four_bit_keys_are_ignored_with_a_warning_unless_4bit(tiny_clip_dir):
    tree = {
        "model": {"name_or_path": str(tiny_clip_dir), "quantization": "8bit", "quant_type": "fp4"},
        "data": {
            "train": {"synthetic": {"domain": "target", "num_images": 4}},
            "eval": {"target": {"synthetic": {"domain": "target", "num_images": 4}}},
        },
        "train": {"max_steps": 1},
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = validate_config(tree)
    assert cfg.model.quantization == "8bit"
    assert any("model.quant_type ignored (4bit only)" in str(w.message) for w in caught)


def _mapped_files() -> str:
    with open("/proc/self/maps") as fh:
        return fh.read()


@pytest.mark.parametrize("kind", ["4bit", "8bit"])
def test_preparing_the_quantized_base_releases_the_memory_mapped_checkpoint(clip64_dir, kind):
    """from_pretrained leaves the unquantized tensors as views of the mmapped safetensors file, which keeps
    the whole full-precision checkpoint resident; preparing copies them out and the mapping goes, with
    every tensor's values unchanged."""
    from finetune.models.qlora import prepare_quantized_for_training

    checkpoint = str((clip64_dir / "model.safetensors").resolve())
    config = bnb_quantization_config(
        kind, "nf4", True, "float32", full_precision_modules(CLIPModel.config_class.from_pretrained(clip64_dir))
    )
    model, _ = load_model(str(clip64_dir), quantization_config=config, device="cpu")
    assert checkpoint in _mapped_files()  # what the preparation is for
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model = prepare_quantized_for_training(model)
    assert checkpoint not in _mapped_files()
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name].to(value.dtype), value), name
