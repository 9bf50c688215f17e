"""Every command answers bad input the same clear way: the service's messages on the CLI, exit 2, no
traceback; and the edge paths that crashed (a recipe without data.eval.target, a run evaluated per
language) work through the one recipe -> datasets resolver."""

from __future__ import annotations

import json
import math
import socket
import warnings
from pathlib import Path

import pytest

from data_tools.mining import GUARDS, format_guard_counts
from finetune import train
from finetune.cli.index import format_unreadable
from finetune.cli.main import main as cli_main
from finetune.config.load import load_config, load_resolved_config, save_config
from finetune.config.specs import dataset_specs, eval_specs
from finetune.errors import TrainingInterrupted

ROOT = Path(__file__).resolve().parents[3]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MULTILINGUAL = "recipes/multilingual_demo.yaml"
SMALL_MULTILINGUAL = [
    "data.train.synthetic.num_images=12",
    *(f"data.eval.languages.{code}.synthetic.num_images=6" for code in ("en", "de", "es", "zh")),
]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-k", "0"], "error: k: must be within 1..100 (--max-k), got 0\n"),
        (["-k", "-1"], "error: k: must be within 1..100 (--max-k), got -1\n"),
        (["-k", "101"], "error: k: must be within 1..100 (--max-k), got 101\n"),
        (["--weight", "1.5", "--image", "x.png"], "error: weight: the image's weight in a fused query must be within 0..1, got 1.5\n"),
    ],
)
def test_search_refuses_what_the_service_refuses_with_its_message(args, message, capsys):
    assert cli_main(["search", "no-such-index", "--text", "a red circle", *args]) == 2
    assert capsys.readouterr().err == message


def test_search_refuses_an_empty_text(capsys):
    assert cli_main(["search", "no-such-index", "--text", ""]) == 2
    assert capsys.readouterr().err == "error: text: empty; give a query text or leave the field out\n"


def test_search_names_a_missing_index_folder(capsys):
    assert cli_main(["search", "no-such-index", "--text", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-index: no such index folder") and "Traceback" not in err


def test_export_refuses_an_alpha_outside_0_1_unless_asked(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--alpha", "1.5"]) == 2
    assert "alpha 1.5: outside [0, 1]" in capsys.readouterr().err
    # Asked for by name it gets past the check (and fails later, on the folder that is no run).
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "x"), "--alpha", "1.5", "--allow-extrapolation"]) == 2
    assert "no resolved config" in capsys.readouterr().err


def test_serve_says_the_port_is_busy_before_its_banner(tmp_path, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert cli_main(["serve", str(tmp_path), "--port", str(port)]) == 2
    out, err = capsys.readouterr()
    assert f"port {port} on 127.0.0.1 is in use" in err and "Serving" not in out


def test_ctrl_c_in_training_says_where_it_stopped_and_how_to_resume(monkeypatch, capsys):
    def interrupted(cfg):
        raise TrainingInterrupted(7, Path("runs/demo/checkpoints/step-00000005"))

    monkeypatch.setattr(train, "run", interrupted)
    assert train.main(["recipes/demo.yaml", "train.max_steps=9"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 7; last checkpoint runs/demo/checkpoints/step-00000005" in err
    assert "Resume with: domainclip train recipes/demo.yaml train.max_steps=9 train.resume_from=latest" in err
    assert "Traceback" not in err


def test_mine_prints_no_nan_when_nothing_is_kept():
    keys = ("anchors", "candidates", *GUARDS, "margin", "eligible", "kept")
    counts = {"t2i": dict.fromkeys(keys, 0), "i2t": {**dict.fromkeys(keys, 1), "kept": 2}}
    means = {"t2i": {"mined": math.nan, "random": math.nan}, "i2t": {"mined": 0.5, "random": 0.25}}
    table = format_guard_counts(counts, means)
    assert "nan" not in table and "none kept" in table and "0.5000" in table


def test_index_names_the_unreadable_corpus_images():
    line = format_unreadable({"corrupt_images": 7, "unreadable_image_ids": ["a.png", "b.png", "c.png"]}, shown=2)
    assert line == "Skipped 7 unreadable corpus image(s), not indexed: a.png, b.png, ... (5 more in manifest.json)"
    assert format_unreadable({"corrupt_images": 0}) is None


def test_a_saved_config_loads_without_notices_about_keys_never_set(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings(record=True) as on_save:
        warnings.simplefilter("always")
        save_config(load_config(MULTILINGUAL), tmp_path / "config.yaml")
    with warnings.catch_warnings(record=True) as on_load:
        warnings.simplefilter("always")
        cfg = load_resolved_config(tmp_path / "config.yaml")
    assert cfg.model.text_tower == "recipes/assets/demo-xlmr"
    assert [str(w.message) for w in on_load] == []
    assert on_save or True  # the recipe itself may warn; what matters is the reload


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_resolves_to_the_datasets_it_names(path, monkeypatch):
    monkeypatch.chdir(ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = load_config(path)
    specs = dataset_specs(cfg)
    assert all(spec is not None for spec in specs.values())
    assert (cfg.data.eval.target is not None) == ("data.eval.target" in specs)
    assert (cfg.data.eval.source is not None) == ("data.eval.source" in specs)
    assert sum(k.startswith("data.replay.") for k in specs) == len(cfg.data.replay)
    names = eval_specs(cfg)
    assert set(names) == {
        *(["target"] if cfg.data.eval.target else []),
        *(["source"] if cfg.data.eval.source else []),
        *(cfg.data.eval.languages or {}),
    }
    assert names  # every recipe evaluates on something


def test_data_inspect_a_recipe_without_a_target_eval_set(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    assert cli_main(["data", "inspect", MULTILINGUAL, *SMALL_MULTILINGUAL, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert {"data.train", "data.eval.languages.de", "data.eval.languages.zh"} <= set(report)
    assert "data.eval.target" not in report and "data.eval.languages.de" in out


def test_push_dry_run_of_a_run_evaluated_per_language(tmp_path, monkeypatch, capsys):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    save_config(load_config(MULTILINGUAL), run / "config.yaml")
    (run / "adapter").mkdir()
    (run / "adapter" / "adapter_config.json").write_text("{}")
    rows = {set_: {"t2i": {"R@1": r1}, "i2t": {"R@1": r1}} for set_, r1 in (("en", 40.0), ("de", 30.0))}
    (run / "eval").mkdir()
    (run / "eval" / "results.json").write_text(json.dumps({"zero_shot": rows, "adapted": rows, "original_clip": rows}))
    staging = tmp_path / "staging"
    assert cli_main(["push", str(run), "--repo", "me/multilingual", "--dry-run", "--staging", str(staging)]) == 0
    card = ModelCard.load(staging / "README.md")
    names = {r.dataset_name for r in card.data.eval_results}
    assert "de (data.eval.languages.de) eval set (synthetic source domain)" in names
    assert len(card.data.eval_results) == 8  # 2 rows x 2 languages x 2 directions
