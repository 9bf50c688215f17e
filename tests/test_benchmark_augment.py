"""scripts/benchmark_augment.py on its tiny setting: one JSON document with a rate per configuration."""

from __future__ import annotations

import json

from scripts import benchmark_augment


def test_tiny_augment_benchmark_prints_rates_for_every_configuration(tmp_path, capsys):
    out = tmp_path / "augment.json"
    assert benchmark_augment.main(["--tiny", "--workers", "0", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == doc
    assert set(doc["images_per_s"]) == set(benchmark_augment.CONFIGS) and all(r > 0 for r in doc["images_per_s"].values())
    assert doc["relative_to_off"]["off"] == 1.0 and doc["met"] in (True, False)
    assert doc["setting"]["images"] == 16 and doc["setting"]["workers"] == 0
