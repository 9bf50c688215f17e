"""`domainclip export` end to end on small runs: the alpha sweep and its rule, int8 behind the quality
gate (a deliberately broken quantization trips it and writes nothing), fp16/bf16 folders."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn
from transformers import CLIPModel

from finetune.cli.main import main as cli_main
from finetune.errors import ExportError
from finetune.export import exporter
from finetune.export.alpha import alpha_name, choose_alpha
from finetune.export.merge import load_export
from finetune.export.quantize import quantize as real_quantize
from tests.finetune.runs import DEMO_BASE, make_run


def test_alpha_sweep_writes_table_curve_and_picks_by_the_rule(tmp_path, tiny_clip_dir):
    run = make_run(tmp_path / "run", tiny_clip_dir, export={"min_source_retention": 0.0})
    out = tmp_path / "export"
    assert cli_main(["export", str(run), "--out", str(out), "--alpha-sweep", "0,0.5,1"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    rows = manifest["alpha_rule"]["rows"]
    assert [r["alpha"] for r in rows] == [0.0, 0.5, 1.0]
    # every alpha qualifies at retention 0; alpha=0 (the base) is the reference, never the pick
    best = max((r for r in rows if r["alpha"] > 0), key=lambda r: (r["target"], -r["alpha"]))
    assert manifest["alpha"] == best["alpha"]
    sweep = json.loads((out / "alpha_sweep" / "results.json").read_text())
    assert set(sweep) == {"alpha=0", "alpha=0.5", "alpha=1"}
    assert sweep[alpha_name(manifest["alpha"])] == manifest["results"]["fp32"]
    assert (out / "alpha_sweep" / "alpha_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 0.5 |" in (out / "alpha_sweep" / "alpha_table.md").read_text()
    CLIPModel.from_pretrained(out)


def _rows(target_source: dict) -> dict:
    return {alpha_name(a): {"target": {"t2i": {"R@1": t}}, "source": {"t2i": {"R@1": s}}} for a, (t, s) in target_source.items()}


def test_choose_alpha_keeps_the_source_and_says_what_happens_when_nothing_does():
    results = _rows({0.0: (10.0, 80.0), 0.5: (40.0, 77.0), 0.75: (50.0, 70.0), 1.0: (60.0, 5.0)})
    alphas = [0.0, 0.5, 0.75, 1.0]
    pick = dict(direction="t2i", metric="R@1")
    assert choose_alpha(results, alphas, if_none="error", min_source_retention=0.95, **pick).alpha == 0.5  # 77 >= 76 > 70
    assert choose_alpha(results, alphas, if_none="error", min_source_retention=0.85, **pick).alpha == 0.75
    # Only alpha=0 (the unchanged base) keeps 99%: an error with the table, or the best-retaining alpha > 0.
    with pytest.raises(ExportError, match=r"no alpha > 0 in the sweep keeps source t2i R@1 >= 99% of zero-shot \(80.00\)"):
        choose_alpha(results, alphas, if_none="error", min_source_retention=0.99, **pick)
    fallback = choose_alpha(results, alphas, if_none="most_retention", min_source_retention=0.99, **pick)
    assert fallback.alpha == 0.5 and "best source score" in fallback.reason
    with pytest.raises(ExportError, match="must include 0"):
        choose_alpha(results, [0.5, 1.0], if_none="error", min_source_retention=0.95, **pick)


@pytest.fixture
def demo_run(tmp_path):
    """The demo base (it retrieves its source domain well), adapters near zero: R@1 far from chance."""
    return make_run(
        tmp_path / "run", DEMO_BASE, eval_images=120, target_domain="source", lora_scale=0.01, export={"max_r1_drop": 2.0}
    )  # 120 images: one query is 0.83 points


def test_int8_passes_its_gate_and_the_manifest_records_the_measurements(demo_run, tmp_path, capsys):
    out = tmp_path / "export"
    assert cli_main(["export", str(demo_run), "--out", str(out), "--dtype", "int8"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    q = manifest["quantization"]
    assert manifest["dtype"] == "int8" and manifest["results"]["fp32"]["target"]["t2i"]["R@1"] > 40
    assert max(q["r1_drop_points"].values()) <= 2.0 and q["max_r1_drop"] == 2.0
    assert set(q["throughput"]) == {"fp32", "int8"} and q["throughput_ratio_vs_fp32"]["images"] > 0
    assert q["state_bytes"]["int8"] < q["state_bytes"]["fp32"]
    assert q["r_at_k_delta_points"]["t2i"]["R@1"] == pytest.approx(
        manifest["results"]["int8"]["target"]["t2i"]["R@1"] - manifest["results"]["fp32"]["target"]["t2i"]["R@1"]
    )
    model, _, loaded = load_export(out)
    assert loaded["dtype"] == "int8" and any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    assert "throughput vs fp32" in capsys.readouterr().out


def break_then_quantize(model, dtype):
    """int8 after putting a huge weight in every row of every Linear: all other weights round to zero."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight[:, 0] = 1e4  # an outlier in every output row: per-row scales cannot help
    return real_quantize(model, dtype)


def test_a_broken_quantization_trips_the_gate_and_writes_nothing(demo_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(exporter, "quantize", break_then_quantize)
    out = tmp_path / "export"
    assert cli_main(["export", str(demo_run), "--out", str(out), "--dtype", "int8"]) == 3
    err = capsys.readouterr().err
    assert "quality gate: the int8 export loses more target R@1 than export.max_r1_drop=2.0" in err
    assert "Nothing was written" in err and not out.exists()


@pytest.mark.parametrize("dtype,torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_precision_exports_are_saved_in_their_dtype(tiny_clip_dir, tmp_path, dtype, torch_dtype):
    run = make_run(tmp_path / "run", tiny_clip_dir, export={"max_r1_drop": 100})
    manifest = exporter.export_run(run, tmp_path / "export", alpha=1.0, dtype=dtype, log=lambda *_: None)
    assert manifest["dtype"] == dtype
    plain = CLIPModel.from_pretrained(tmp_path / "export")
    assert plain.visual_projection.weight.dtype == torch_dtype
