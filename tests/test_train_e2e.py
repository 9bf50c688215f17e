"""The real entry point (`finetune/train.py` main) on every recipe, pointed at local tiny stand-ins
through overrides: the same `from_pretrained(path)` / `load_dataset(path)` code a hub id takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState
from peft import PeftModel
from safetensors.torch import load_file
from transformers import CLIPModel

from finetune import train
from finetune.checkpoint import latest_checkpoint, read_trainer_state

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["train.batch_size=8", "eval.batch_size=64", "train.log_every_steps=1", "data.num_workers=0"]


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def demo_overrides(tiny_clip_dir, out: Path, steps: int = 4) -> list[str]:
    return [
        f"model.name_or_path={tiny_clip_dir}",
        f"train.output_dir={out}",
        f"train.max_steps={steps}",
        "train.checkpoint_every_steps=2",
        "data.train.synthetic.num_images=24",
        "data.eval.target.synthetic.num_images=12",
        "data.eval.source.synthetic.num_images=12",
        "optim.warmup_steps=1",
        *SMALL,
    ]


def assert_run_artifacts(out: Path, sets: set[str], steps: int) -> dict:
    assert (out / "config.yaml").is_file()
    assert (out / "adapter" / "adapter_config.json").is_file()
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert (out / "README.md").read_text().count("zero-shot") >= 1
    ckpt = latest_checkpoint(out / "checkpoints")
    assert ckpt is not None and read_trainer_state(ckpt)["step"] == steps
    results = json.loads((out / "eval" / "results.json").read_text())
    assert set(results) == {"zero_shot", "adapted"}
    for phase in results.values():
        assert set(phase) == sets
        for directions in phase.values():
            assert set(directions) == {"t2i", "i2t"}
            for metrics in directions.values():
                assert set(metrics) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
                assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 100.0
    assert (out / "eval" / "results.md").read_text().startswith("# Retrieval")
    assert (out / "eval" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "contrastive" in r] == list(range(1, steps + 1))
    return results


def test_demo_recipe_end_to_end(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out)]) == 0
    assert_run_artifacts(out, {"target", "source"}, steps=4)
    assert "| target | t2i       | R@1" in capsys.readouterr().out
    # the saved adapter loads through plain PEFT
    model = PeftModel.from_pretrained(CLIPModel.from_pretrained(tiny_clip_dir), out / "adapter")
    assert any("lora_A" in n for n, _ in model.named_parameters())


def hub_standin_overrides(model_dir, data_dir, out: Path, steps: int) -> list[str]:
    """Point a hub recipe's model and data at local folders; `epochs` gives way to a few steps."""
    return [
        f"model.name_or_path={model_dir}",
        f"data.train.path={data_dir}",
        f"data.eval.target.path={data_dir}",
        f"train.output_dir={out}",
        "train.epochs=null",
        f"train.max_steps={steps}",
    ]


def test_medical_recipe_on_local_roco_standin(tiny_clip_dir, roco_like_dir, tmp_path):
    out = tmp_path / "med"
    overrides = [
        *hub_standin_overrides(tiny_clip_dir, roco_like_dir, out, steps=3),
        "train.mixed_precision=bf16",  # the recipe's own precision, on CPU
        "data.max_text_length=32",
        "eval.every_steps=2",
        "lora.vision.rank=8",
        "train.gradient_accumulation_steps=2",  # 48 pairs / 8 = 6 micro-batches = 3 optimizer steps
        *SMALL,
    ]
    assert train.main(["recipes/medical.yaml", *overrides]) == 0
    results = assert_run_artifacts(out, {"target"}, steps=3)
    assert results["adapted"]["target"]["t2i"]["R@10"] > 0
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert any("eval" in r and r["step"] == 2 for r in evals)


def test_fashion_recipe_on_local_standin(tiny_clip_dir, fashion_like_dir, tmp_path):
    out = tmp_path / "fashion"
    overrides = [
        *hub_standin_overrides(tiny_clip_dir, fashion_like_dir, out, steps=2),
        "train.mixed_precision=no",
        "train.enable_gradient_checkpointing=true",  # adapters must still get gradients (checked at step 1)
        "data.max_text_length=32",
        *SMALL,
    ]
    assert train.main(["recipes/fashion.yaml", *overrides]) == 0
    assert_run_artifacts(out, {"target"}, steps=2)


def trainable_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out / "checkpoints") / "trainable_0.safetensors")


class SimulatedKill(Exception):
    pass


def test_resume_after_interruption_matches_uninterrupted_run(tiny_clip_dir, tmp_path, monkeypatch):
    # 24 images x 2 captions / batch 8 = 6 batches an epoch: the cut at step 8 lies inside epoch 1,
    # so resuming must replay epoch 1's order and skip the 2 batches already seen.
    full = tmp_path / "full"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, full, steps=10)]) == 0
    AcceleratorState._reset_state(True)

    # Die right after the step-8 checkpoint, leaving a half-written step-10 folder behind.
    cut = tmp_path / "cut"
    real_save = train.save_checkpoint

    def save_then_die(accelerator, root, step, state, keep_last):
        path = real_save(accelerator, root, step, state, keep_last)
        if step == 8:
            (Path(root) / ".tmp-step-00000010").mkdir()
            (Path(root) / ".tmp-step-00000010" / "trainable_0.safetensors").write_bytes(b"half written")
            raise SimulatedKill(step)
        return path

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(SimulatedKill):
        train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, cut, steps=10)])
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    AcceleratorState._reset_state(True)
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000008"
    assert read_trainer_state(latest_checkpoint(cut / "checkpoints"))["epoch"] == 1

    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, cut, steps=10), "train.resume_from=latest"]) == 0
    assert not (cut / "checkpoints" / ".tmp-step-00000010").exists()
    assert read_trainer_state(latest_checkpoint(cut / "checkpoints"))["step"] == 10
    a, b = trainable_tensors(full), trainable_tensors(cut)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # the resumed run's log continues at step 9, not from 1
    steps = [json.loads(l)["step"] for l in (cut / "train_log.jsonl").read_text().splitlines() if "contrastive" in l]
    assert steps == list(range(1, 11))


def test_bad_recipe_exits_nonzero_with_all_problems(tiny_clip_dir, tmp_path, capsys):
    code = train.main(
        ["recipes/demo.yaml", "lora.vision.rnak=4", "optim.lr=fast", "model.name_or_path=./does/not/exist", f"train.output_dir={tmp_path}/x"]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "lora.vision.rnak: unknown key; did you mean 'lora.vision.rank'?" in err
    assert "optim.lr:" in err and "model.name_or_path: path does not exist: ./does/not/exist" in err
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_unloadable_hub_id_offline_names_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = train.main(["recipes/demo.yaml", "model.name_or_path=no-such-org/no-such-clip", f"train.output_dir={tmp_path}/o"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.name_or_path" in err and "no-such-org/no-such-clip" in err and "offline" in err


def test_target_modules_matching_nothing_fails_loudly(tiny_clip_dir, tmp_path, capsys):
    code = train.main(
        ["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "r"), "lora.text.target_modules=[query]"]
    )
    assert code == 2
    assert "lora.text.target_modules: ['query'] match no Linear layer" in capsys.readouterr().err


def test_script_runs_as_a_file(tiny_clip_dir, tmp_path):
    """`python finetune/train.py recipe ...` (what `accelerate launch` executes) works from the repo root."""
    out = tmp_path / "script"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "finetune/train.py", "recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=2)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_two_processes_equal_one_process_with_the_global_batch(tiny_clip_dir, tmp_path):
    """2 CPU processes x batch 8, features gathered before the loss == 1 process x batch 16.

    Same pairs per step (Accelerate deals consecutive batches to ranks), same negatives, and the
    gather's backward + DDP averaging give the full-batch gradient: the weights must agree.
    """
    common = [
        "recipes/demo.yaml",
        f"model.name_or_path={tiny_clip_dir}",
        "train.max_steps=3",
        "train.checkpoint_every_steps=null",
        "data.train.synthetic.num_images=40",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source.synthetic.num_images=8",
        "eval.zero_shot=false",
        "data.num_workers=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29517"]
    proc = subprocess.run(
        [*launch, "finetune/train.py", *common, "train.batch_size=8", f"train.output_dir={tmp_path / 'two'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("Trainable vision") == 1  # one main process logs
    assert train.main([*common, "train.batch_size=16", f"train.output_dir={tmp_path / 'one'}"]) == 0

    two, one = trainable_tensors(tmp_path / "two"), trainable_tensors(tmp_path / "one")
    assert two.keys() == one.keys()
    assert max(one[k].abs().max() for k in one if "lora_B" in k) > 0  # the adapters did train
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6, msg=name)
    # sharded evaluation (each process embeds half, gathered in order) scores like one process
    r2 = json.loads((tmp_path / "two" / "eval" / "results.json").read_text())["adapted"]
    r1 = json.loads((tmp_path / "one" / "eval" / "results.json").read_text())["adapted"]
    for name in ("target", "source"):
        for direction in ("t2i", "i2t"):
            assert r2[name][direction] == pytest.approx(r1[name][direction]), (name, direction)


def test_corrupt_images_are_skipped_and_counted(tiny_clip_dir, tmp_path, capsys):
    import datasets

    from data_tools.synthetic import generate_domain

    cols = generate_domain("target", 20, image_size=32, seed=5)
    images = [{"bytes": None, "path": None} for _ in cols["image"]]
    for i, img in enumerate(cols["image"]):
        import io

        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images[i] = {"bytes": buf.getvalue() if i % 5 else b"not an image", "path": None}  # 4 corrupt
    ds = datasets.Dataset.from_dict(
        {"image": images, "caption": [c[0] for c in cols["caption"]]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    data = tmp_path / "data"
    data.mkdir()
    ds.to_parquet(str(data / "train-00000-of-00001.parquet"))
    out = tmp_path / "run"
    code = train.main(
        [
            "recipes/demo.yaml",
            f"model.name_or_path={tiny_clip_dir}",
            "data.train.synthetic=null",
            f"data.train.path={tmp_path}",
            "data.eval.target.synthetic=null",
            f"data.eval.target.path={tmp_path}",
            "data.eval.source=null",
            f"train.output_dir={out}",
            "train.max_steps=2",
            "train.batch_size=10",
            "data.num_workers=0",
            "eval.ks=[1,15,16]",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "Skipped unreadable images: train 4, eval {'target': 4}" in printed
    results = json.loads((out / "eval" / "results.json").read_text())
    # 16 readable images remain: every caption's image is within the top 16, not always the top 15
    assert results["adapted"]["target"]["t2i"]["R@16"] == 100.0
    assert results["adapted"]["target"]["t2i"]["mean_rank"] <= 16.0


def test_non_finite_loss_stops_with_a_clear_error(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from finetune.losses import ClipInfoNCE

    def nan_loss(self, *args, **kwargs):
        return {"contrastive": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(ClipInfoNCE, "forward", nan_loss)
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "nan")]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err and "contrastive=nan" in err
    assert not (tmp_path / "nan" / "adapter").exists()


def test_adapters_without_gradient_stop_after_the_first_step(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "lora_gradient_report", lambda model: {"vision": True, "text": False})
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "dead")]) == 2
    assert "LoRA adapters in the text tower(s) got no gradient after the first step" in capsys.readouterr().err


def test_a_fresh_run_never_reuses_an_older_runs_folder(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=2)]) == 0
    AcceleratorState._reset_state(True)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=2)]) == 2
    assert "already holds checkpoints of an earlier run" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_adapter_folder_is_self_contained(tiny_clip_dir, tmp_path):
    """What a user ships: adapter + processor + card, loadable without the run folder."""
    from transformers import CLIPProcessor

    out = tmp_path / "run"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=2)]) == 0
    adapter = out / "adapter"
    card = (adapter / "README.md").read_text()
    assert "base_model: " in card and "| target | t2i" in card and "7 in-batch negatives per pair"  # batch 8, one process in card
    assert (adapter / "preprocessor_config.json").is_file()
    processor = CLIPProcessor.from_pretrained(adapter)
    assert processor.tokenizer("a red circle")["input_ids"] == CLIPProcessor.from_pretrained(tiny_clip_dir).tokenizer("a red circle")["input_ids"]


def test_cpu_flag_with_several_processes_says_it_runs_one(tiny_clip_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process; the run must say so, not hide it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "--main_process_port", "29518",
         "finetune/train.py", "recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "cpu", steps=1)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started a single process" in proc.stdout and "--multi_gpu --num_processes N" in proc.stdout
