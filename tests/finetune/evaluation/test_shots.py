"""`domainclip study shots` (finetune/evaluation/shots.py): the k-shot draw the loader applies, the step budget,
resuming without redoing finished cells, bad input answered in one line, and the real training entry point
end to end on a tiny CLIP."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState

from data_tools.loading import few_shot_rows, load_image_text_dataset
from finetune.cli.main import main
from finetune.errors import ConfigError
from finetune.evaluation.shots import MAX_STEPS, SHOT_EPOCHS, run_shots_study, step_budget

TRAIN = {"synthetic": {"domain": "target", "num_images": 40, "seed": 0}, "label_column": "label"}


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)


def write_recipe(tmp_path: Path, tiny_clip_dir: Path, train_spec: dict = TRAIN) -> Path:
    recipe = {
        "model": {"name_or_path": str(tiny_clip_dir)},
        "data": {
            "train": train_spec,
            "eval": {
                "target": {"synthetic": {"domain": "target", "num_images": 24, "seed": 1}, "label_column": "label"},
                "source": {"synthetic": {"domain": "source", "num_images": 8, "seed": 1}, "label_column": "label"},
            },
            "num_workers": 0,
        },
        "optim": {"lr": 2.0e-3, "warmup_steps": 5},
        "train": {"output_dir": str(tmp_path / "run"), "batch_size": 64, "max_steps": 10},
        "eval": {"batch_size": 64},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def images_per_class(pairs) -> dict[str, int]:
    return Counter(label for label, _ in {(r["label"], r["image_id"]) for r in pairs.select_columns(["label", "image_id"])})


# --- the k-shot draw -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:data.train.shots_per_class=4")  # short classes: asserted below
def test_the_draw_keeps_k_images_per_class_deterministically():
    def draw(k: int, seed: int):
        return load_image_text_dataset(key="data.train", shots_per_class=k, shots_seed=seed, report=(report := {}), **TRAIN), report

    full = images_per_class(load_image_text_dataset(key="data.train", **TRAIN))
    pairs, report = draw(2, 0)
    assert images_per_class(pairs) == {c: min(2, n) for c, n in full.items()}
    assert report["shots_short_classes"] == {c: n for c, n in full.items() if n < 2}
    ids = lambda p: sorted(set(p["image_id"]))  # noqa: E731
    assert ids(draw(2, 0)[0]) == ids(pairs)  # same seed, same images
    assert ids(draw(2, 1)[0]) != ids(pairs)  # another seed, other images
    assert set(ids(pairs)) <= set(ids(draw(4, 0)[0]))  # a seed's k-shot set holds its smaller ones


def test_the_draw_is_by_image_and_reports_short_classes():
    # rows 0/1 are one image with two captions; class b has one image
    image_ids = ["x", "x", "y", "z", "w", "v"]
    labels = ["a", "a", "a", "b", "a", "c"]
    rows, short = few_shot_rows(image_ids, labels, 2, seed=0)
    kept = {image_ids[r] for r in rows}
    assert rows == sorted(rows) and len(kept & {"x", "y", "w"}) == 2 and {"z", "v"} <= kept
    assert ("x" in kept) == (rows[:2] == [0, 1])  # an image keeps all its rows
    assert short == {"b": 1, "c": 1}


def test_the_schema_asks_for_labels_with_shots(tmp_path, tiny_clip_dir):
    recipe = write_recipe(tmp_path, tiny_clip_dir, {"synthetic": TRAIN["synthetic"], "shots_per_class": 2})
    from finetune.config.load import load_config

    with pytest.raises(ConfigError, match=r"data.train: shots_per_class=2 draws images per class: set label_column too"):
        load_config(recipe)


# --- the step budget -----------------------------------------------------------------------------------


def test_the_step_budget_scales_with_the_images():
    assert step_budget(8, 128) == (SHOT_EPOCHS, 8)  # 1 shot x 8 classes: the batch is every image
    assert step_budget(128, 128) == (SHOT_EPOCHS, 128)
    assert step_budget(100, 64) == (math.ceil(SHOT_EPOCHS * 100 / 64), 64)  # past one batch, steps grow with k
    assert step_budget(10**6, 64) == (MAX_STEPS, 64)


# --- resume, with the training replaced by a stand-in that counts its calls ----------------------------


def stand_in_training(calls: list):
    def train(cfg) -> int:
        calls.append(cfg)
        out = Path(cfg.train.output_dir)
        (out / "checkpoints" / "step-1").mkdir(parents=True)
        row = {"top1": 10.0 * cfg.data.train.shots_per_class + cfg.train.seed, "macro_top1": 5.0}
        results = {"adapted": {"target": {"classification": row}}}
        if cfg.eval.zero_shot:
            results["zero_shot"] = {"target": {"classification": {"top1": 1.0, "macro_top1": 2.0}}}
        (out / "eval").mkdir()
        (out / "eval" / "results.json").write_text(json.dumps(results))
        return 0

    return train


def test_a_rerun_skips_finished_cells_and_redoes_an_interrupted_one(tmp_path, tiny_clip_dir):
    recipe, out = write_recipe(tmp_path, tiny_clip_dir), tmp_path / "study"
    calls: list = []
    report = run_shots_study(recipe, [], shots=[1, 2], seeds=2, out=out, train=stand_in_training(calls))
    assert [(c.data.train.shots_per_class, c.train.seed, c.eval.zero_shot) for c in calls] == [
        (1, 0, True),  # zero-shot measured once, by the first cell
        (1, 1, False),
        (2, 0, False),
        (2, 1, False),
    ]
    first = calls[0]
    assert (first.train.max_steps, first.train.batch_size) == step_budget(report["cells"][0]["images"], 64)
    assert first.train.checkpoint_every_steps is None and first.eval.every_steps is None and first.optim.warmup_steps <= 5
    assert first.data.eval.source is None  # only the set the study scores
    assert [c["lora"]["top1"] for c in report["cells"]] == [10.0, 11.0, 20.0, 21.0]
    assert not (out / "runs" / "k1_s0" / "checkpoints").exists()  # a finished cell keeps its adapter, not its checkpoints
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert sorted(mtimes) == ["k1_s0.json", "k1_s1.json", "k2_s0.json", "k2_s1.json"]

    again: list = []
    assert run_shots_study(recipe, [], shots=[1, 2], seeds=2, out=out, train=stand_in_training(again))["cells"] == report["cells"]
    assert again == [] and {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == mtimes

    def interrupted(cfg):
        (Path(cfg.train.output_dir) / "half-written").write_text("")
        raise KeyboardInterrupt

    (out / "cells" / "k2_s1.json").unlink()
    with pytest.raises(KeyboardInterrupt):
        run_shots_study(recipe, [], shots=[1, 2], seeds=2, out=out, train=interrupted)
    assert (out / "runs" / "k2_s1" / "half-written").exists() and not (out / "cells" / "k2_s1.json").exists()
    resumed: list = []
    run_shots_study(recipe, [], shots=[1, 2], seeds=2, out=out, train=stand_in_training(resumed))
    assert [(c.data.train.shots_per_class, c.train.seed) for c in resumed] == [(2, 1)]
    assert not (out / "runs" / "k2_s1" / "half-written").exists()  # the cut-short cell started from scratch

    with pytest.raises(ConfigError, match=r"holds a study of another recipe.*optim.lr: 0.002 there, 0.001 now"):
        run_shots_study(recipe, ["optim.lr=1e-3"], shots=[1], seeds=1, out=out, train=stand_in_training([]))


# --- the command ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shots", "0,2"], "--shots: comma-separated positive integers like 1,2,4,8,16, got '0,2'"),
        (["--shots", "1,two"], "--shots: comma-separated positive integers"),
        (["--seeds", "0"], "--seeds: at least 1 seed per k, got 0"),
        (["data.train.label_column=null"], "data.train.label_column: a shots study draws k labelled images per class"),
        (["data.eval.target.label_column=null"], "data.eval.target.label_column: the study scores classification top-1"),
    ],
)
def test_bad_input_is_one_line_not_a_traceback(tmp_path, tiny_clip_dir, capsys, argv, message):
    recipe = write_recipe(tmp_path, tiny_clip_dir)
    assert main(["study", "shots", str(recipe), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    import finetune.train

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune.train, "run", interrupted)
    recipe, out = write_recipe(tmp_path, tiny_clip_dir), tmp_path / "study"
    assert main(["study", "shots", str(recipe), "--shots", "2,1", "--seeds", "1", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "cell k=1 seed=0 stopped" in err and "the same command resumes the study" in err
    assert f"domainclip study shots {recipe} --shots 1,2 --seeds 1 --out {out}" in err


def test_the_study_end_to_end(tmp_path, tiny_clip_dir, capsys, monkeypatch):
    monkeypatch.setattr("finetune.evaluation.shots.SHOT_EPOCHS", 5)  # the artifacts are the point here, not the numbers
    recipe, out = write_recipe(tmp_path, tiny_clip_dir), tmp_path / "study"
    assert main(["study", "shots", str(recipe), "--shots", "1,2", "--seeds", "2", "--out", str(out)]) == 0
    report = json.loads((out / "shots.json").read_text())
    assert (out / "shots.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [(c["k"], c["seed"]) for c in report["cells"]] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for cell in report["cells"]:
        run = Path(cell["run_dir"])
        results = json.loads((run / "eval" / "results.json").read_text())
        assert cell["lora"]["top1"] == results["adapted"]["target"]["classification"]["top1"]
        assert (run / "adapter" / "adapter_config.json").is_file() and not (run / "checkpoints").exists()
        assert (cell["steps"], cell["batch_size"]) == step_budget(cell["images"], 64)
        assert 0 <= cell["probe"]["top1"] <= 100 and cell["probe"]["C"] > 0

    md = (out / "shots.md").read_text()
    top1 = md.split("## Top-1 (%)", 1)[1].split("##", 1)[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in top1.splitlines() if re.match(r"\| \d", line)]
    assert [int(r[0]) for r in rows] == [1, 2]
    pm = lambda s, sign="": f"{s['mean']:{sign}.1f} ± {s['std']:.1f}"  # noqa: E731
    for row, summary in zip(rows, report["summary"]):
        assert row[3] == f"{report['zero_shot']['top1']:.1f}"
        assert row[4] == pm(summary["probe_top1"])
        assert row[5] == pm(summary["lora_top1"])
        assert row[6] == pm(summary["lora_minus_probe_top1"], "+")
        lora = [c["lora"]["top1"] for c in report["cells"] if c["k"] == summary["k"]]
        assert summary["lora_top1"]["mean"] == pytest.approx(sum(lora) / 2)
    printed = capsys.readouterr().out
    assert top1.strip().splitlines()[0] in printed  # the table is printed too
