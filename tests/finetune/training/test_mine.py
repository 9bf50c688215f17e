"""The mining builder (finetune/training/mining.py) and `domainclip mine` on a tiny CLIP and generated data."""

from __future__ import annotations

import hashlib
import json

import datasets
import pyarrow.parquet as pq
import pytest

from data_tools.loading import load_image_text_dataset
from data_tools.mining import GUARDS, MiningSettings
from finetune.cli import main as cli
from finetune.models.load import load_model
from finetune.training.mining import (
    mine_training_set,
    read_negatives,
    reusable,
    summarize,
    write_negatives,
)


def tiny_settings(**changes) -> MiningSettings:
    base = dict(
        negatives_per_anchor=3,
        rank_min=1,
        rank_max=16,
        absolute_margin=0.0,
        relative_margin=0.0,
        near_duplicate_threshold=0.999,
        sampling="random",
        directions=("t2i", "i2t"),
        seed=0,
    )
    return MiningSettings(**{**base, **changes})


@pytest.fixture(scope="module")
def pairs_with_a_copied_image():
    """16 generated images x 2 captions, then image 0's bytes again under a new image id with another caption."""
    pairs = load_image_text_dataset(
        key="data.train",
        label_column="label",
        synthetic={"domain": "target", "num_images": 16, "captions_per_image": 2, "seed": 0, "image_size": 32},
    )
    copy = pairs.select([0]).map(
        lambda row: {"image_id": "copy-of-0", "image_index": 16, "caption": "an unrelated caption", "source_row": 16, "label": "other"}
    )
    return datasets.concatenate_datasets([pairs, copy.cast(pairs.features)])


def test_the_copied_image_is_caught_by_its_bytes_and_the_file_is_identical_across_runs(tiny_clip_dir, pairs_with_a_copied_image, tmp_path):
    model, processor = load_model(str(tiny_clip_dir))
    pairs = pairs_with_a_copied_image
    results = [
        mine_training_set(model, processor, pairs, len(pairs), tiny_settings(rank_max=40), batch_size=8, max_text_length=32)
        for _ in range(2)
    ]
    digests = []
    for i, result in enumerate(results):
        path = tmp_path / f"run{i}" / "negatives.parquet"
        write_negatives(
            result, path, summarize(result, tiny_settings(rank_max=40), step=0, model="base", num_pairs=len(pairs), seconds=0.0)
        )
        digests.append(hashlib.sha256(path.read_bytes()).hexdigest())
    assert digests[0] == digests[1]  # same seed, same model, same data: the same bytes

    result = results[0]
    # Image 0 (2 captions) and its copy (1 caption, another label) hold the same bytes, so the same embedding:
    # counted under duplicate_hash (before near_duplicate, which would also catch them). Every rank is in the
    # window (rank_max 40 > 33 candidates): t2i 2 + 1 anchors see the other image; i2t 2 x 1 + 1 x 2 captions.
    assert (result.counts["t2i"]["duplicate_hash"], result.counts["i2t"]["duplicate_hash"]) == (3, 4)
    assert (result.counts["t2i"]["same_image"], result.counts["i2t"]["same_image"]) == (
        33,
        32 * 2 + 1,
    )  # i2t: both captions of its image per anchor
    rows = result.rows
    labels = dict(zip(pairs["image_id"], pairs["label"]))
    image_of_row = pairs["image_id"]
    for a, n in zip(rows["anchor_image_id"], rows["negative_image_id"]):
        assert a != n and {a, n} != {"0", "copy-of-0"} and labels[a] != labels[n]
    assert all(image_of_row[r] == i for r, i in zip(rows["negative_row"], rows["negative_image_id"]))  # stable ids agree
    table = pq.read_table(tmp_path / "run0" / "negatives.parquet")
    assert table.column_names == [
        "anchor_row",
        "anchor_image_id",
        "negative_row",
        "negative_image_id",
        "direction",
        "score",
        "positive_score",
        "rank",
    ]
    assert read_negatives(tmp_path / "run0" / "negatives.parquet").keys() <= set(range(len(pairs)))
    assert reusable(tmp_path / "run0" / "negatives.parquet", tiny_settings(rank_max=40), len(pairs))
    assert not reusable(tmp_path / "run0" / "negatives.parquet", tiny_settings(rank_max=8), len(pairs))  # other settings: mine again


def test_mine_command_prints_the_guard_table_and_writes_the_file(tiny_clip_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(
        [
            "mine",
            "recipes/demo.yaml",
            f"model.name_or_path={tiny_clip_dir}",
            f"train.output_dir={out}",
            "data.train.synthetic.num_images=24",
            "mining.relative_margin=0",
            "train.batch_size=8",
            "eval.batch_size=32",
            "data.num_workers=0",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    for guard in GUARDS:
        assert f"| guard: {guard} |" in printed
    assert "mean score, mined negatives" in printed and "Batch sampler, epoch 0, global batch 8" in printed
    path = out / "mining" / "negatives-step00000000.parquet"
    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["num_pairs"] == 48 and summary["rows"] == pq.read_metadata(path).num_rows > 0
    assert set(summary["counts"]) == {"t2i", "i2t"} and summary["batch_sampler_epoch0"]["epoch_rows"] == 48
    assert f"Wrote {path}" in printed


def test_mine_command_names_a_bad_key(tmp_path, capsys):
    assert cli.main(["mine", "recipes/demo.yaml", "mining.rank_mx=3", f"train.output_dir={tmp_path}"]) == 2
    assert "mining.rank_mx: unknown key; did you mean 'mining.rank_max'?" in capsys.readouterr().err


def test_mining_recipe_mistakes_name_their_keys():
    from finetune.config.load import load_config
    from finetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"mining.rank_min \(10\) must be <= mining.rank_max \(5\)"):
        load_config("recipes/demo.yaml", ["mining.rank_min=10", "mining.rank_max=5"])
    with pytest.raises(ConfigError, match="mining.sampling: Input should be 'top' or 'random'"):
        load_config("recipes/demo.yaml", ["mining.sampling=best"])
    with pytest.raises(ConfigError, match=r"mining.negatives_per_anchor_in_batch \(4\) must be < train.batch_size \(4\)"):
        load_config("recipes/demo.yaml", ["mining.enabled=true", "train.batch_size=4", "mining.negatives_per_anchor_in_batch=4"])
    with pytest.warns(UserWarning, match="mining.refresh_every_steps ignored"):
        load_config("recipes/demo.yaml", ["mining.refresh_every_steps=10"])


def test_the_sampler_groups_negatives_in_the_rows_one_loss_sees():
    from data_tools.sampling import EpochShuffleSampler
    from finetune.config.load import load_config
    from finetune.training.mining import build_mined_sampler

    base = EpochShuffleSampler(64, seed=0)
    on = ["mining.enabled=true", "train.batch_size=8"]
    assert build_mined_sampler(load_config("recipes/demo.yaml", on), base, 4).global_batch == 32  # gathered: 8 x 4 processes
    alone = load_config("recipes/demo.yaml", [*on, "loss.gather_across_processes=false"])
    assert build_mined_sampler(alone, base, 4).global_batch == 8  # each process's loss sees its own batch
    assert build_mined_sampler(load_config("recipes/demo.yaml"), base, 4) is base  # mining off: the recipe's sampler
