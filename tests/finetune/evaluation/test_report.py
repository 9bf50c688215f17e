"""Tests for finetune.evaluation.report (tables, JSON, chart) and finetune.evaluation.card (the model card)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest

from finetune.config.load import validate_config
from finetune.evaluation import report
from finetune.evaluation.card import describe_negatives, write_model_card
from finetune.evaluation.metrics import duplicate_caption_texts
from finetune.evaluation.report import (
    describe_duplicate_captions,
    format_results_table,
    format_set_notes,
    write_results,
)

RESULTS = {
    "zero_shot": {
        "target": {
            "t2i": {"R@1": 10.0, "R@5": 30.25, "mean_rank": 12.0, "median_rank": 4.0},
            "i2t": {"R@1": 12.5, "R@5": 40.0, "mean_rank": 9.0, "median_rank": 3.0},
        },
        "source": {
            "t2i": {"R@1": 50.0, "R@5": 80.0, "mean_rank": 2.0, "median_rank": 1.0},
        },
    },
    "adapted": {
        "target": {
            "t2i": {"R@1": 33.5, "R@5": 60.0, "mean_rank": 5.25, "median_rank": 2.0},
            "i2t": {"R@1": 40.0, "R@5": 70.0, "mean_rank": 4.0, "median_rank": 1.5},
        },
    },
}

# The two-model table exactly as results.md and the README have always shown it.
TWO_MODEL_TABLE = """\
| set    | direction | metric      | zero-shot | adapted |  delta |
|:-------|:----------|:------------|----------:|--------:|-------:|
| target | t2i       | R@1         |     10.00 |   33.50 | +23.50 |
| target | t2i       | R@5         |     30.25 |   60.00 | +29.75 |
| target | t2i       | mean_rank   |     12.00 |    5.25 |  -6.75 |
| target | t2i       | median_rank |      4.00 |    2.00 |  -2.00 |
| target | i2t       | R@1         |     12.50 |   40.00 | +27.50 |
| target | i2t       | R@5         |     40.00 |   70.00 | +30.00 |
| target | i2t       | mean_rank   |      9.00 |    4.00 |  -5.00 |
| target | i2t       | median_rank |      3.00 |    1.50 |  -1.50 |
| source | t2i       | R@1         |     50.00 |       - |      - |
| source | t2i       | R@5         |     80.00 |       - |      - |
| source | t2i       | mean_rank   |      2.00 |       - |      - |
| source | t2i       | median_rank |      1.00 |       - |      - |"""


def _table(table: str) -> tuple[list[str], dict[tuple[str, str, str], list[str]]]:
    """Header cells and (set, direction, metric) -> remaining cells, skipping the rule row."""
    lines = table.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert set(lines[1]) <= set("|-: ")
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(header), line
        rows[tuple(cells[:3])] = cells[3:]
    return header, rows


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def test_two_models_table_is_byte_identical_to_the_established_format() -> None:
    assert format_results_table(RESULTS) == TWO_MODEL_TABLE
    # Insertion order does not move the baseline: it is the anchor of every delta.
    swapped = {"adapted": RESULTS["adapted"], "zero_shot": RESULTS["zero_shot"]}
    assert format_results_table(swapped) == TWO_MODEL_TABLE


def test_table_values_deltas_and_order() -> None:
    header, rows = _table(format_results_table(RESULTS))
    assert header == ["set", "direction", "metric", "zero-shot", "adapted", "delta"]
    assert rows[("target", "t2i", "mean_rank")] == ["12.00", "5.25", "-6.75"]
    assert rows[("source", "t2i", "R@1")] == ["50.00", "-", "-"]
    assert ("source", "i2t", "R@1") not in rows
    keys = list(rows)
    assert keys[0] == ("target", "t2i", "R@1") and keys[-1][0] == "source"
    assert keys.index(("target", "t2i", "R@5")) < keys.index(("target", "t2i", "mean_rank"))


def test_any_number_of_named_models() -> None:
    results = {
        "zero_shot": RESULTS["zero_shot"],
        "adapted": RESULTS["adapted"],
        "alpha=0.5": {"target": {"t2i": {"R@1": 20.0, "R@5": 45.5}}},
        "int8": {"target": {"t2i": {"R@1": 33.0}}, "source": {"t2i": {"R@1": 49.0}}},
    }
    table = format_results_table(results)
    header, rows = _table(table)
    assert header == [
        "set",
        "direction",
        "metric",
        "zero-shot",
        "adapted",
        "alpha=0.5",
        "int8",
        "delta adapted",
        "delta alpha=0.5",
        "delta int8",
    ]
    assert rows[("target", "t2i", "R@1")] == ["10.00", "33.50", "20.00", "33.00", "+23.50", "+10.00", "+23.00"]
    assert rows[("target", "t2i", "R@5")] == ["30.25", "60.00", "45.50", "-", "+29.75", "+15.25", "-"]
    assert rows[("source", "t2i", "R@1")] == ["50.00", "-", "-", "49.00", "-", "-", "-1.00"]
    assert len({len(line) for line in table.splitlines()}) == 1  # padded to equal width


def test_without_the_baseline_there_are_no_deltas() -> None:
    header, rows = _table(format_results_table({"adapted": RESULTS["adapted"]}))
    assert header == ["set", "direction", "metric", "adapted"]
    assert rows[("target", "i2t", "R@1")] == ["40.00"]
    # Any name can be the baseline.
    header, rows = _table(format_results_table(RESULTS, baseline="adapted"))
    assert header == ["set", "direction", "metric", "adapted", "zero-shot", "delta"]
    assert rows[("target", "t2i", "R@1")] == ["33.50", "10.00", "-23.50"]


def test_unknown_model_names_are_allowed() -> None:
    header, rows = _table(format_results_table({"zeroshot": RESULTS["zero_shot"]}))
    assert header == ["set", "direction", "metric", "zeroshot"]
    assert rows[("target", "t2i", "R@1")] == ["10.00"]


def test_numpy_values_and_tiny_negative_deltas() -> None:
    results = {
        "zero_shot": {"target": {"t2i": {"R@1": np.float32(50.0), "mean_rank": 2.0}}},
        "adapted": {"target": {"t2i": {"R@1": np.float64(50.001), "mean_rank": 1.999}}},
    }
    _, rows = _table(format_results_table(results))
    assert rows[("target", "t2i", "R@1")] == ["50.00", "50.00", "+0.00"]
    assert rows[("target", "t2i", "mean_rank")] == ["2.00", "2.00", "+0.00"]  # never "-0.00"


@pytest.mark.parametrize(
    ("results", "match"),
    [
        ([1, 2], r"^results must be a mapping keyed by model name .*got list"),
        ({"adapted": 3.0}, r"^results\['adapted'\] must be a mapping keyed by set name .*got float"),
        ({"adapted": {"target": [1]}}, r"^results\['adapted'\]\['target'\] must be a mapping keyed by direction"),
        ({"adapted": {"target": {"t2i": 5}}}, r"^results\['adapted'\]\['target'\]\['t2i'\] must be a mapping keyed by metric"),
        (
            {"adapted": {"target": {"t2i": {"R@1": "57"}}}},
            r"^results\['adapted'\]\['target'\]\['t2i'\]\['R@1'\] must be a number, got str '57'",
        ),
        ({"adapted": {"target": {"t2i": {"R@1": True}}}}, r"\['R@1'\] must be a number, got bool"),
        ({1: {}}, r"^results keys must be model names \(str\), got 1"),
    ],
)
def test_bad_shapes_raise_naming_the_path(results, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        format_results_table(results)
    with pytest.raises(ValueError, match=match):
        write_results(results, "unused")


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


def _colors_in_png(path) -> set[tuple[int, int, int]]:
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return {tuple(int(c) for c in p) for p in np.unique(pixels, axis=0)}


def _rgb(hex_color: str) -> tuple[int, int, int]:
    return tuple(int(hex_color[i : i + 2], 16) for i in (1, 3, 5))


def test_write_results_creates_three_files(tmp_path) -> None:
    out_dir = tmp_path / "nested" / "run"
    paths = write_results(RESULTS, str(out_dir))  # str accepted as well as Path

    assert paths == {
        "json": out_dir / "results.json",
        "md": out_dir / "results.md",
        "png": out_dir / "results.png",
    }
    # No temp files left behind by the atomic writes.
    assert sorted(p.name for p in out_dir.iterdir()) == ["results.json", "results.md", "results.png"]
    assert json.loads(paths["json"].read_text()) == RESULTS

    md = paths["md"].read_text()
    assert md == (
        "# Retrieval: zero-shot vs adapted\n\n"
        "R@K is the percentage of queries whose correct match is ranked in the top K "
        "(higher is better); mean/median rank is the rank of the first correct match "
        "(lower is better). Delta is adapted minus zero-shot.\n\n"
        f"{TWO_MODEL_TABLE}\n"
    )

    png = paths["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    colors = _colors_in_png(paths["png"])
    assert {_rgb(report._BASELINE_COLOR), _rgb(report._MODEL_COLORS[0])} <= colors
    assert _rgb(report._MODEL_COLORS[1]) not in colors  # only two models, two bar colours


def test_png_draws_one_bar_colour_per_model(tmp_path) -> None:
    results = {
        "zero_shot": RESULTS["zero_shot"],
        "adapted": RESULTS["adapted"],
        "int8": {"target": {"t2i": {"R@1": 33.0}}},
    }
    paths = write_results(results, tmp_path)
    colors = _colors_in_png(paths["png"])
    for color in (report._BASELINE_COLOR, *report._MODEL_COLORS[:2]):
        assert _rgb(color) in colors
    assert _rgb(report._MODEL_COLORS[2]) not in colors
    md = paths["md"].read_text()
    assert md.startswith("# Retrieval: zero-shot vs adapted vs int8\n")
    assert "Each delta column is that model minus zero-shot." in md
    assert format_results_table(results) in md


def test_set_notes_under_the_table(tmp_path) -> None:
    stats = duplicate_caption_texts(["red disc", "red disc", "blue box", "red disc", "green bar"])
    note = describe_duplicate_captions(stats)
    assert note == (
        "3 of 5 captions share their exact text with another caption (1 distinct texts, most often "
        "'red disc'); identical texts embed identically, so such captions of different images tie "
        "exactly and R@1 cannot reach 100."
    )
    assert describe_duplicate_captions(duplicate_caption_texts(["a", "b"])) == "all 2 captions have distinct texts."
    notes = {"source": "all 3 captions have distinct texts.", "target": note}
    assert format_set_notes(notes) == f"- **target**: {note}\n- **source**: all 3 captions have distinct texts."
    md = write_results(RESULTS, tmp_path, set_notes=notes)["md"].read_text()
    assert md.endswith(f"{TWO_MODEL_TABLE}\n\n{format_set_notes(notes)}\n")
    with pytest.raises(ValueError, match=r"set_notes\['target'\] must be a str, got dict"):
        write_results(RESULTS, tmp_path / "other", set_notes={"target": stats})
    assert not (tmp_path / "other").exists()  # validated before anything is written


def test_failed_chart_keeps_the_previous_png(tmp_path, monkeypatch) -> None:
    paths = write_results(RESULTS, tmp_path)
    before = paths["png"].read_bytes()

    def broken(results, baseline, fh):
        fh.write(b"\x89PNG half")
        raise RuntimeError("no fonts")

    monkeypatch.setattr(report, "_save_results_png", broken)
    changed = copy.deepcopy(RESULTS)
    changed["adapted"]["target"]["t2i"]["R@1"] = 99.0
    with pytest.raises(RuntimeError, match="no fonts"):
        write_results(changed, tmp_path)
    assert paths["png"].read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json", "results.md", "results.png"]


# --------------------------------------------------------------------------------------------------
# Model card
# --------------------------------------------------------------------------------------------------


def _cfg(batch_size: int, gather: bool):
    return validate_config(
        {
            "model": {"name_or_path": "openai/clip-vit-base-patch16"},
            "data": {
                "train": {"synthetic": {"domain": "target", "num_images": 8}},
                "eval": {"target": {"synthetic": {"domain": "target", "num_images": 8, "seed": 1}}},
            },
            "loss": {"gather_across_processes": gather},
            "train": {"max_steps": 10, "batch_size": batch_size},
        }
    )


@pytest.mark.parametrize(
    ("num_processes", "gather", "expected"),
    [
        (1, True, "Each contrastive loss sees one batch of 8 pairs: up to 7 in-batch negatives per pair"),
        (1, False, "Each contrastive loss sees one batch of 8 pairs: up to 7 in-batch negatives per pair"),
        (
            2,
            True,
            "Features are gathered across the 2 processes before the loss, so each contrastive loss "
            "sees 16 pairs: up to 15 in-batch negatives per pair",
        ),
        (
            2,
            False,
            "Features are not gathered across processes (`loss.gather_across_processes: false`), so "
            "each process's contrastive loss sees only its own 8 pairs: up to 7 in-batch negatives "
            "per pair, not 15",
        ),
    ],
)
def test_model_card_states_the_true_negatives(tmp_path, num_processes: int, gather: bool, expected: str) -> None:
    assert describe_negatives(8, num_processes, gather).startswith(expected)
    path = tmp_path / "README.md"
    write_model_card(
        path,
        cfg=_cfg(8, gather),
        results_table=TWO_MODEL_TABLE,
        trainable={"vision": {"trainable": 1234, "total": 10_000}, "text": {"trainable": 56, "total": 900}},
        steps=10,
        train_seconds=3.2,
        num_processes=num_processes,
        set_notes={"target": "note about duplicates"},
    )
    card = path.read_text()
    assert " ".join(card.split()).count(expected) == 1  # the sentence may wrap across lines
    assert "10 optimizer steps of 8 pairs per process x " + str(num_processes) in card
    assert f"{TWO_MODEL_TABLE}\n\n- **target**: note about duplicates\n" in card
    assert "1,234 trainable parameters" in card
    assert card.startswith("---\nlibrary_name: peft\nbase_model: openai/clip-vit-base-patch16\n")
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # written atomically, nothing else


def test_describe_negatives_rejects_bad_counts() -> None:
    with pytest.raises(ValueError, match="num_processes must be a positive int, got 0"):
        describe_negatives(8, 0, True)
    with pytest.raises(ValueError, match="batch_size must be a positive int, got 2.0"):
        describe_negatives(2.0, 1, True)
