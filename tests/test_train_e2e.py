"""The real entry point (`finetune/train.py` main) on every recipe, pointed at local tiny stand-ins
through overrides: the same `from_pretrained(path)` / `load_dataset(path)` code a hub id takes."""

from __future__ import annotations

import json
import os
import re
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
from finetune.training.checkpoint import latest_checkpoint, read_trainer_state

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
        "data.replay=[{synthetic: {domain: source, num_images: 8, seed: 2}, fraction: 0.25}]",  # the demo's replay, small
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
    baselines = {"linear_probe", "knn"} & set(results)  # only with a labelled data.train and labelled eval sets
    assert set(results) - baselines == {"zero_shot", "adapted"}
    for name in baselines:
        assert all(set(results[name][s]) == {"classification", "per_class"} for s in results[name])
    for phase in (results[n] for n in ("zero_shot", "adapted")):
        assert set(phase) == sets
        for directions in phase.values():
            # sets with a label column add the class-level keys
            assert set(directions) - {"classification", "class_retrieval", "long_tail", "per_class"} == {"t2i", "i2t"}
            for direction in ("t2i", "i2t"):
                metrics = directions[direction]
                assert set(metrics) == {"R@1", "R@5", "R@10", "mean_rank", "median_rank"}
                assert 0.0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 100.0
            if "classification" in directions:
                assert 0.0 <= directions["classification"]["top1"] <= directions["classification"]["top5"] <= 100.0
    assert (out / "eval" / "results.md").read_text().startswith("# Retrieval")
    assert (out / "eval" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "infonce" in r] == list(range(1, steps + 1))
    return results


def test_demo_recipe_end_to_end(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "demo"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out)]) == 0
    assert_run_artifacts(out, {"target", "source"}, steps=4)
    printed = capsys.readouterr().out
    assert re.search(r"\| target \| t2i +\| R@1 ", printed) and re.search(r"\| target \| classification +\| top1 ", printed)
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


def test_medical_recipe_on_local_roco_standin(tiny_clip_dir, roco_like_dir, tmp_path, capsys):
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
    # bf16 on a CPU, 4x4 patches + CLS and 32-token captions: both towers get eager attention (model.attn_implementation: auto)
    assert "Attention: vision eager (17 tokens), text eager (32 tokens) (model.attn_implementation=auto)" in capsys.readouterr().out
    assert_run_artifacts(out, {"target"}, steps=3)
    # Accumulation of 2: three optimizer steps consumed all six micro-batches of the epoch.
    state = read_trainer_state(latest_checkpoint(out / "checkpoints"))
    assert (state["step"], state["epoch"], state["batches_done_in_epoch"]) == (3, 0, 6)
    evals = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in evals if "eval" in r] == [2]


def test_fashion_recipe_on_local_standin(tiny_clip_dir, fashion_like_dir, tmp_path):
    def overrides(out, checkpointing: bool):
        return [
            *hub_standin_overrides(tiny_clip_dir, fashion_like_dir, out, steps=2),
            "train.mixed_precision=no",
            f"train.enable_gradient_checkpointing={str(checkpointing).lower()}",
            "data.max_text_length=32",
            "eval.zero_shot=false",
            *SMALL,
        ]

    # Gradient checkpointing recomputes activations (dropout RNG restored): same weights as the plain path.
    assert train.main(["recipes/fashion.yaml", *overrides(tmp_path / "gc", True)]) == 0
    AcceleratorState._reset_state(True)
    assert train.main(["recipes/fashion.yaml", *overrides(tmp_path / "plain", False)]) == 0
    with_gc, plain = trainable_tensors(tmp_path / "gc"), trainable_tensors(tmp_path / "plain")
    assert with_gc.keys() == plain.keys()
    assert max(plain[k].abs().max() for k in plain if "lora_B" in k) > 0
    for name in plain:
        torch.testing.assert_close(with_gc[name], plain[name], rtol=0, atol=1e-6, msg=name)


def trainable_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(latest_checkpoint(out / "checkpoints") / "trainable_0.safetensors")


class SimulatedKill(Exception):
    pass


# LoRA dropout draws from the global RNG every step: a resume is exact only if nothing else (such as
# creating a DataLoader iterator) draws from it in between.
DROPOUT = ["lora.vision.dropout=0.1", "lora.text.dropout=0.1"]


def test_resume_after_interruption_matches_uninterrupted_run(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    # Without replay (the resume test with replay and long-tail sampling is in test_labels_e2e.py):
    # 24 images x 2 captions / batch 8 = 6 batches an epoch: the cut after step 9 lies inside epoch 1,
    # so resuming from the step-8 checkpoint must replay epoch 1's order and skip the 2 batches seen.
    saved_steps = []
    real_save = train.save_checkpoint

    def recording_save(accelerator, root, step, state, keep_last):
        saved_steps.append(step)
        return real_save(accelerator, root, step, state, keep_last)

    monkeypatch.setattr(train, "save_checkpoint", recording_save)
    full = tmp_path / "full"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, full, steps=10), *DROPOUT, "data.replay=[]"]) == 0
    assert saved_steps == [2, 4, 6, 8, 10]  # the final checkpoint is the periodic one, written once
    AcceleratorState._reset_state(True)

    # Die after step 9 was logged (between checkpoints), leaving a half-written step-10 folder behind.
    cut = tmp_path / "cut"
    real_append = train.append_log

    def log_then_die(path, record):
        real_append(path, record)
        if record.get("step") == 9:
            (cut / "checkpoints" / ".tmp-step-00000010").mkdir()
            (cut / "checkpoints" / ".tmp-step-00000010" / "trainable_0.safetensors").write_bytes(b"half written")
            raise SimulatedKill(9)

    monkeypatch.setattr(train, "append_log", log_then_die)
    with pytest.raises(SimulatedKill):
        train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, cut, steps=10), *DROPOUT, "data.replay=[]"])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)
    assert latest_checkpoint(cut / "checkpoints").name == "step-00000008"
    assert read_trainer_state(latest_checkpoint(cut / "checkpoints"))["epoch"] == 1

    # A resume that would not be exact is refused, naming what changed; nothing is touched.
    capsys.readouterr()
    changed = ["train.batch_size=4", "optim.lr=0.5"]
    assert (
        train.main(
            [
                "recipes/demo.yaml",
                *demo_overrides(tiny_clip_dir, cut, steps=10),
                *DROPOUT,
                "data.replay=[]",
                "train.resume_from=latest",
                *changed,
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "cannot resume" in err and "train.batch_size: 8 -> 4" in err and "optim.lr: 0.002 -> 0.5" in err
    AcceleratorState._reset_state(True)

    # Logging cadence may change freely; the resume continues exactly.
    saved_steps.clear()
    assert (
        train.main(
            ["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, cut, steps=10), *DROPOUT, "data.replay=[]", "train.resume_from=latest"]
        )
        == 0
    )
    assert saved_steps == [10]
    assert not (cut / "checkpoints" / ".tmp-step-00000010").exists()
    assert read_trainer_state(latest_checkpoint(cut / "checkpoints"))["step"] == 10
    a, b = trainable_tensors(full), trainable_tensors(cut)
    assert a.keys() == b.keys() and len(a) > 0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)
    # the log holds each step once: step 9's line from before the kill was cut back on resume
    steps = [json.loads(l)["step"] for l in (cut / "train_log.jsonl").read_text().splitlines() if "infonce" in l]
    assert steps == list(range(1, 11))
    full_log = [json.loads(l) for l in (full / "train_log.jsonl").read_text().splitlines()]
    cut_log = [json.loads(l) for l in (cut / "train_log.jsonl").read_text().splitlines()]
    assert [r["infonce"] for r in cut_log] == pytest.approx([r["infonce"] for r in full_log], abs=1e-5)


def test_unreadable_image_count_survives_a_resume(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    data = write_parquet_split(tmp_path / "data", 20, corrupt={i for i in range(20) if i % 5 == 0})
    common = ["recipes/demo.yaml", "train.max_steps=4", "train.batch_size=5", "train.checkpoint_every_steps=2", "eval.zero_shot=false"]
    assert train.main([*common, *local_data_overrides(tiny_clip_dir, data, data, tmp_path / "full")]) == 0
    full = read_trainer_state(latest_checkpoint(tmp_path / "full" / "checkpoints"))["skipped_images"]
    assert full > 0
    AcceleratorState._reset_state(True)

    real_append = train.append_log

    def log_then_die(path, record):
        real_append(path, record)
        if record.get("step") == 3:
            raise SimulatedKill(3)

    monkeypatch.setattr(train, "append_log", log_then_die)
    with pytest.raises(SimulatedKill):
        train.main([*common, *local_data_overrides(tiny_clip_dir, data, data, tmp_path / "cut"), "train.log_every_steps=1"])
    monkeypatch.setattr(train, "append_log", real_append)
    AcceleratorState._reset_state(True)
    resumed = [*common, *local_data_overrides(tiny_clip_dir, data, data, tmp_path / "cut"), "train.resume_from=latest"]
    assert train.main(resumed) == 0
    assert read_trainer_state(latest_checkpoint(tmp_path / "cut" / "checkpoints"))["skipped_images"] == full
    assert f"Skipped unreadable images: train {full}," in capsys.readouterr().out


def test_bad_recipe_exits_nonzero_with_all_problems(tiny_clip_dir, tmp_path, capsys):
    code = train.main(
        [
            "recipes/demo.yaml",
            "lora.vision.rnak=4",
            "optim.lr=fast",
            "model.name_or_path=./does/not/exist",
            f"train.output_dir={tmp_path}/x",
        ]
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
    code = train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "r"), "lora.text.target_modules=[query]"])
    assert code == 2
    assert "lora.text.target_modules: ['query'] match no Linear layer" in capsys.readouterr().err


def test_script_runs_as_a_file(tiny_clip_dir, tmp_path):
    """`python finetune/train.py recipe ...` (what `accelerate launch` executes) works from the repo root."""
    out = tmp_path / "script"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "finetune/train.py", "recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=2)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    screen = proc.stdout + proc.stderr
    for noise in ("gemm_4bit_forward", "Generating train split", "Downloading data", "Map:", "Normalizing"):
        assert noise not in screen, noise


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
        "data.replay=[{synthetic: {domain: source, num_images: 8, seed: 2}, fraction: 0.25}]",  # the mix shards too
        "eval.zero_shot=false",
        "data.num_workers=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "finetune.cli.main", "train", "--num-processes", "2", "--main-process-port", "29517"]
    proc = subprocess.run(
        [*launch, *common, "train.batch_size=8", f"train.output_dir={tmp_path / 'two'}", "eval.every_steps=2"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "values were not passed" not in proc.stdout + proc.stderr  # the launcher got every setting
    assert proc.stdout.count("Trainable vision") == 1  # one main process logs
    assert proc.stdout.count("step 2: target t2i R@1") + proc.stderr.count("step 2: target t2i R@1") == 1
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


def write_parquet_split(folder: Path, n: int, corrupt, seed: int = 5) -> Path:
    """A parquet train split of n target-domain images; rows in `corrupt` hold bytes no decoder reads."""
    import io

    import datasets

    from data_tools.synthetic.domains import generate_domain

    cols = generate_domain("target", n, image_size=32, seed=seed)
    images = []
    for i, img in enumerate(cols["image"]):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        images.append({"bytes": b"not an image" if i in corrupt else buf.getvalue(), "path": None})
    ds = datasets.Dataset.from_dict(
        {"image": images, "caption": [c[0] for c in cols["caption"]]},
        features=datasets.Features({"image": datasets.Image(), "caption": datasets.Value("string")}),
    )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ds.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))
    return folder


def local_data_overrides(model_dir, train_dir, eval_dir, out: Path) -> list[str]:
    return [
        f"model.name_or_path={model_dir}",
        f"data.train={{path: {train_dir}}}",  # whole specs: no label column, no templates
        f"data.eval.target={{path: {eval_dir}}}",
        "data.eval.source=null",
        "data.replay=[]",
        f"train.output_dir={out}",
        "data.num_workers=0",
    ]


def test_corrupt_images_are_skipped_and_counted(tiny_clip_dir, tmp_path, capsys):
    data = write_parquet_split(tmp_path / "data", 20, corrupt={i for i in range(20) if i % 5 == 0})  # 4 corrupt
    out = tmp_path / "run"
    code = train.main(
        [
            "recipes/demo.yaml",
            *local_data_overrides(tiny_clip_dir, data, data, out),
            "train.max_steps=2",
            "train.batch_size=10",
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


def test_a_batch_without_two_readable_images_is_skipped_not_fatal(tiny_clip_dir, tmp_path, capsys):
    # Batches of 2 from 12 rows, 6 unreadable: some batches keep one pair or none, i.e. no negative.
    train_dir = write_parquet_split(tmp_path / "train", 12, corrupt={0, 1, 2, 3, 4, 5}, seed=6)
    eval_dir = write_parquet_split(tmp_path / "eval", 8, corrupt=set(), seed=7)
    out = tmp_path / "run"
    code = train.main(
        [
            "recipes/demo.yaml",
            *local_data_overrides(tiny_clip_dir, train_dir, eval_dir, out),
            "train.max_steps=6",
            "train.batch_size=2",
            "train.checkpoint_every_steps=null",
            "eval.zero_shot=false",
        ]
    )
    assert code == 0
    state = read_trainer_state(latest_checkpoint(out / "checkpoints"))
    assert state["step"] == 6 and state["skipped_batches"] >= 1
    # Every batch was drawn: the skipped ones did not count as steps.
    assert state["epoch"] * 6 + state["batches_done_in_epoch"] == 6 + state["skipped_batches"]
    assert f"Skipped {state['skipped_batches']} training batches" in capsys.readouterr().out


def test_a_training_set_with_no_readable_image_stops_with_a_clear_error(tiny_clip_dir, tmp_path, capsys):
    train_dir = write_parquet_split(tmp_path / "train", 8, corrupt=set(range(8)))
    eval_dir = write_parquet_split(tmp_path / "eval", 8, corrupt=set(), seed=7)
    code = train.main(
        [
            "recipes/demo.yaml",
            *local_data_overrides(tiny_clip_dir, train_dir, eval_dir, tmp_path / "run"),
            "train.max_steps=3",
            "train.batch_size=4",
            "eval.zero_shot=false",
        ]
    )
    assert code == 2
    assert "data.train: a whole pass over the data had no batch with two readable images" in capsys.readouterr().err


def test_an_eval_set_with_no_readable_image_stops_with_a_clear_error(tiny_clip_dir, tmp_path, capsys):
    train_dir = write_parquet_split(tmp_path / "train", 8, corrupt=set())
    eval_dir = write_parquet_split(tmp_path / "eval", 6, corrupt=set(range(6)), seed=7)
    code = train.main(
        [
            "recipes/demo.yaml",
            *local_data_overrides(tiny_clip_dir, train_dir, eval_dir, tmp_path / "run"),
            "train.max_steps=1",
            "train.batch_size=4",
        ]
    )
    assert code == 2
    assert "all 6 images are unreadable" in capsys.readouterr().err


def test_non_finite_loss_stops_with_a_clear_error(tiny_clip_dir, tmp_path, monkeypatch, capsys):
    from finetune.training.losses import ClipInfoNCE

    def nan_loss(self, *args, **kwargs):
        return {"contrastive": torch.tensor(float("nan"), requires_grad=True)}

    monkeypatch.setattr(ClipInfoNCE, "forward", nan_loss)
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "nan")]) == 2
    err = capsys.readouterr().err
    assert "non-finite loss at step 1" in err and "infonce=nan" in err
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
    assert "base_model: " in card and "| target | t2i" in card
    assert "7 in-batch negatives per pair" in card  # batch 8, one process
    assert (adapter / "preprocessor_config.json").is_file()
    processor = CLIPProcessor.from_pretrained(adapter)
    assert (
        processor.tokenizer("a red circle")["input_ids"]
        == CLIPProcessor.from_pretrained(tiny_clip_dir).tokenizer("a red circle")["input_ids"]
    )


def test_cpu_flag_with_several_processes_says_it_runs_one(tiny_clip_dir, tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts one process; the run must say so, not hide it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--cpu",
            "--num_processes",
            "2",
            "--main_process_port",
            "29518",
            "finetune/train.py",
            "recipes/demo.yaml",
            *demo_overrides(tiny_clip_dir, tmp_path / "cpu", steps=1),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started a single process" in proc.stdout and "--multi_gpu --num_processes N" in proc.stdout


def test_errors_from_libraries_keep_their_traceback(tiny_clip_dir, tmp_path, monkeypatch):
    """Only the toolkit's own errors become one 'error:' line; a ValueError from below is a bug to see."""
    from finetune.training.losses import ClipInfoNCE

    def broken(self, features, batch):
        raise ValueError("shape mismatch deep inside a library")

    monkeypatch.setattr(ClipInfoNCE, "forward", broken)
    with pytest.raises(ValueError, match="shape mismatch deep inside a library"):
        train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "bug")])


def test_max_text_length_above_the_models_limit_is_a_recipe_error_before_any_work(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "long"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out), "data.max_text_length=100"]) == 2
    err = capsys.readouterr().err
    assert "data.max_text_length: 100 is more than the text tower" in err and "(32 tokens); use at most 32" in err
    assert not out.exists()


def test_truncated_captions_are_counted_and_named_at_load_time(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "short"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=1), "data.max_text_length=6"]) == 0
    printed = capsys.readouterr().out
    assert "warning: data.train: 48 of 48 captions are longer than 6 tokens and will be cut" in printed
    assert "warning: data.eval.target:" in printed and "data.max_text_length" in printed


def test_a_loss_with_its_own_parameter_is_optimised_and_checkpointed(tiny_clip_dir, tmp_path, monkeypatch):
    from finetune.training.losses import ClipInfoNCE

    class InfoNCEWithBias(ClipInfoNCE):
        """A learned bias on the loss: stands in for any term with parameters (e.g. SigLIP's bias)."""

        def __init__(self):
            super().__init__()
            self.bias = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, features, batch):
            terms = super().forward(features, batch)
            terms["bias_penalty"] = self.bias**2
            return terms

    monkeypatch.setattr(train, "build_loss", lambda cfg, train_pairs, **_: InfoNCEWithBias())
    out = tmp_path / "bias"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=4)]) == 0
    ckpt = latest_checkpoint(out / "checkpoints")
    bias = load_file(ckpt / "trainable_1.safetensors")["bias"]
    assert 0.0 < bias.item() < 0.5  # the optimizer moved it towards 0
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert all("bias_penalty" in r for r in log)  # a new term is logged without touching the loop


def test_load_adapted_reproduces_the_runs_adapted_numbers(tiny_clip_dir, tmp_path):
    from data_tools.loading import RetrievalSet, load_image_text_dataset
    from finetune.evaluation.evaluate import evaluate_retrieval
    from finetune.models.adapter import load_adapted

    out = tmp_path / "run"
    assert train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, out, steps=3), "model.train_logit_scale=true"]) == 0
    model, processor = load_adapted(out)
    assert not model.training
    sets = {
        "target": RetrievalSet.from_pairs(
            load_image_text_dataset(key="data.eval.target", synthetic=dict(domain="target", num_images=12, seed=1))
        )
    }
    got, _ = evaluate_retrieval(model, processor, sets, batch_size=64, max_text_length=32, ks=(1, 5, 10))
    saved = json.loads((out / "eval" / "results.json").read_text())["adapted"]["target"]
    for direction in ("t2i", "i2t"):
        assert got["target"][direction] == pytest.approx(saved[direction]), direction
    from safetensors.torch import load_file as load

    trained_scale = load(out / "adapter" / "extra_trainables.safetensors")["logit_scale"]
    torch.testing.assert_close(model.get_base_model().logit_scale.detach(), trained_scale)


def test_cpu_runs_use_the_cores_accelerate_launch_would_leave_idle(monkeypatch):
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        monkeypatch.setattr("finetune.threads.other_processes_load", lambda **_: 0.0)  # an idle machine (finetune/threads.py)
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # launched by `accelerate launch`
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # its default when no config says otherwise
        monkeypatch.delenv("DOMAINCLIP_NUM_THREADS", raising=False)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        torch.set_num_threads(1)
        train.share_cpu_threads()
        assert torch.get_num_threads() == cores
        monkeypatch.setenv("DOMAINCLIP_NUM_THREADS", "1")  # the user's own choice wins
        train.share_cpu_threads()
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("DOMAINCLIP_NUM_THREADS")
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")  # plain python with OMP_NUM_THREADS=1: the user's setting
        train.share_cpu_threads()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_resuming_from_a_folder_that_is_not_a_complete_checkpoint_names_the_key(tiny_clip_dir, tmp_path, capsys):
    half = tmp_path / "half-written"
    half.mkdir()
    code = train.main(["recipes/demo.yaml", *demo_overrides(tiny_clip_dir, tmp_path / "r"), f"train.resume_from={half}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "train.resume_from:" in err and "is not a complete checkpoint: trainer_state.json is missing" in err


def test_two_processes_with_the_cached_step_equal_one_process_with_the_full_batch(tiny_clip_dir, tmp_path):
    """GradCache across processes: 2 x batch 8 embedded 3 rows at a time, gathered, with a trained
    temperature (its gradient joins DDP's one reduction) == 1 process x batch 16 in one piece."""
    common = [
        "recipes/demo.yaml",
        f"model.name_or_path={tiny_clip_dir}",
        "model.train_logit_scale=true",
        "train.max_steps=2",
        "train.checkpoint_every_steps=null",
        "data.train.synthetic.num_images=40",
        "data.eval.target.synthetic.num_images=8",
        "data.eval.source.synthetic.num_images=8",
        "eval.zero_shot=false",
        "data.num_workers=0",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "finetune.cli.main", "train", "--num-processes", "2", "--main-process-port", "29518"]
    proc = subprocess.run(
        [*launch, *common, "train.batch_size=8", "train.micro_batch_size=3", f"train.output_dir={tmp_path / 'two'}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert train.main([*common, "train.batch_size=16", f"train.output_dir={tmp_path / 'one'}"]) == 0
    two, one = trainable_tensors(tmp_path / "two"), trainable_tensors(tmp_path / "one")
    assert two.keys() == one.keys() and any("logit_scale" in k for k in one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-5, msg=name)


def test_the_preresized_cache_trains_to_the_same_weights(tiny_clip_dir, roco_like_dir, tmp_path):
    for name, cached in (("plain", "false"), ("cached", "true")):
        overrides = [*hub_standin_overrides(tiny_clip_dir, roco_like_dir, tmp_path / name, steps=2), *SMALL]
        assert (
            train.main(
                ["recipes/medical.yaml", *overrides, "eval.zero_shot=false", "data.max_text_length=32", f"data.cache_preprocessed={cached}"]
            )
            == 0
        )
    plain, cached = trainable_tensors(tmp_path / "plain"), trainable_tensors(tmp_path / "cached")
    for name in plain:
        torch.testing.assert_close(cached[name], plain[name], rtol=0, atol=0, msg=name)
