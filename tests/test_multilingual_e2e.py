"""recipes/multilingual_demo.yaml through the real entry point on tiny stand-ins: text-tower swap, stage 1,
stage 2, per-language results, and a run folder `load_adapted` reads back to the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import CLIPModel

from data_tools.loading import RetrievalSet, load_image_text_dataset
from finetune import train
from finetune.evaluation.evaluate import evaluate_retrieval
from finetune.models.adapter import load_adapted
from finetune.models.towers import image_features

LANGUAGES = ("en", "de", "es", "zh")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def overrides(tiny_clip_dir, tiny_xlmr_dir, out: Path) -> list[str]:
    return [
        f"model.name_or_path={tiny_clip_dir}",
        f"model.text_tower={tiny_xlmr_dir}",
        f"train.output_dir={out}",
        "distill.max_steps=6",
        "distill.batch_size=16",
        "distill.warmup_steps=1",
        "distill.data.synthetic.num_samples=20",
        "data.train.synthetic.num_images=12",
        "train.max_steps=3",
        "train.batch_size=8",
        "optim.warmup_steps=1",
        "train.log_every_steps=1",
        "eval.batch_size=64",
        *(f"data.eval.languages.{lang}.synthetic.num_images=10" for lang in LANGUAGES),
    ]


def test_multilingual_demo_end_to_end(tiny_clip_dir, tiny_xlmr_dir, tmp_path, capsys):
    out = tmp_path / "ml"
    assert train.main(["recipes/multilingual_demo.yaml", *overrides(tiny_clip_dir, tiny_xlmr_dir, out)]) == 0
    printed = capsys.readouterr().out

    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) == {"zero_shot", "original_clip", "distilled", "adapted"}
    assert set(results["original_clip"]) == {"en"}  # the original text tower reads English only
    for name in ("zero_shot", "distilled", "adapted"):
        assert set(results[name]) == set(LANGUAGES)
        for lang in LANGUAGES:
            assert set(results[name][lang]) == {"t2i", "i2t"}
    assert "| zh   | adapted" in printed and (out / "eval" / "languages.md").read_text().startswith("| lang | model")
    assert (out / "eval" / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len((out / "distill_log.jsonl").read_text().splitlines()) == 6
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert 'VisionTextDualEncoderModel.from_pretrained("base_model")' in (out / "README.md").read_text()

    # The run folder loads back (base_model + adapter) and scores exactly what the run reported.
    model, processor = load_adapted(out)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    clip = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    assert torch.equal(image_features(model, pixels), image_features(clip, pixels))  # the image index stays valid
    zh = RetrievalSet.from_pairs(
        load_image_text_dataset(key="zh", synthetic=dict(domain="source", num_images=10, seed=1, languages=["zh"]))
    )
    again, _ = evaluate_retrieval(model, processor, {"zh": zh}, batch_size=64, max_text_length=40)
    for direction in ("t2i", "i2t"):
        for metric, value in results["adapted"]["zh"][direction].items():
            assert again["zh"][direction][metric] == pytest.approx(value, abs=1e-6), (direction, metric)


class SimulatedKill(RuntimeError):
    pass


def test_a_resumed_swap_run_continues_on_the_saved_base_without_distilling_again(tiny_clip_dir, tiny_xlmr_dir, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    import finetune.training.distill as distill

    steps = ["train.max_steps=4", "train.checkpoint_every_steps=2"]
    full = tmp_path / "full"
    assert train.main(["recipes/multilingual_demo.yaml", *overrides(tiny_clip_dir, tiny_xlmr_dir, full), *steps]) == 0
    AcceleratorState._reset_state(True)

    cut = tmp_path / "cut"
    real_append = train.append_log

    def log_then_die(path, record):
        real_append(path, record)
        if record.get("step") == 3:
            raise SimulatedKill(3)

    monkeypatch.setattr(train, "append_log", log_then_die)
    with pytest.raises(SimulatedKill):
        train.main(["recipes/multilingual_demo.yaml", *overrides(tiny_clip_dir, tiny_xlmr_dir, cut), *steps])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)

    def no_second_stage_one(*args, **kwargs):
        raise AssertionError("a resumed run must not distil again")

    monkeypatch.setattr(distill, "distill_text_tower", no_second_stage_one)
    assert (
        train.main(["recipes/multilingual_demo.yaml", *overrides(tiny_clip_dir, tiny_xlmr_dir, cut), *steps, "train.resume_from=latest"])
        == 0
    )
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(cut / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    assert (
        json.loads((cut / "eval" / "results.json").read_text())["distilled"]
        == json.loads((full / "eval" / "results.json").read_text())["distilled"]
    )


def test_stage_two_is_optional(tiny_clip_dir, tiny_xlmr_dir, tmp_path):
    """train.max_steps=0 after distillation: stage 1 alone; the run's adapter is a no-op, so the
    adapted numbers are the distilled ones and later commands load the distilled model."""
    out = tmp_path / "stage1"
    args = [arg for arg in overrides(tiny_clip_dir, tiny_xlmr_dir, out) if not arg.startswith("train.max_steps=")]
    # eval.zero_shot=false too: stage 1 writes its results even when no baseline created eval/ first
    assert train.main(["recipes/multilingual_demo.yaml", *args, "train.max_steps=0", "eval.zero_shot=false"]) == 0
    results = json.loads((out / "eval" / "results.json").read_text())
    for lang in LANGUAGES:
        for direction in ("t2i", "i2t"):
            assert results["adapted"][lang][direction] == pytest.approx(results["distilled"][lang][direction]), (lang, direction)
    assert not (out / "train_log.jsonl").exists() or (out / "train_log.jsonl").read_text() == ""
    model, processor = load_adapted(out)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)


def test_zero_steps_without_distillation_is_a_recipe_error(tiny_clip_dir, tmp_path, capsys):
    code = train.main(
        ["recipes/demo.yaml", f"model.name_or_path={tiny_clip_dir}", f"train.output_dir={tmp_path / 'z'}", "train.max_steps=0"]
    )
    assert code == 2
    assert "train.max_steps: 0 skips the contrastive stage, which only makes sense after distill" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_distil_and_adapt_like_one_with_the_global_batch(tiny_clip_dir, tiny_xlmr_dir, tmp_path):
    """Stage 1 and stage 2 on 2 CPU processes (gloo): each process distils its shard of every batch and
    DDP averages, so 2 x batch 8 must give the weights of 1 x batch 16."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    root = Path(__file__).resolve().parents[1]

    def args(out, distill_batch, batch):
        kept = [a for a in overrides(tiny_clip_dir, tiny_xlmr_dir, out) if not a.startswith(("distill.batch_size=", "train.batch_size="))]
        return [*kept, f"distill.batch_size={distill_batch}", f"train.batch_size={batch}", "eval.zero_shot=false", "data.num_workers=0"]

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "finetune.cli.main",
            "train",
            "--num-processes",
            "2",
            "--main-process-port",
            "29531",
            "recipes/multilingual_demo.yaml",
            *args(tmp_path / "two", 8, 4),
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main(["recipes/multilingual_demo.yaml", *args(tmp_path / "one", 16, 8)]) == 0
    two = load_file(tmp_path / "two" / "base_model" / "model.safetensors")
    one = load_file(tmp_path / "one" / "base_model" / "model.safetensors")
    assert two.keys() == one.keys()
    text = [k for k in one if k.startswith(("text_model.", "text_projection"))]
    assert text and max((two[k] - one[k]).abs().max().item() for k in text) < 1e-5
