"""scripts/benchmark.py on its tiniest setting: one JSON document with the machine and every entry's
figures, target and verdict (the numbers themselves are meaningless at this size)."""

from __future__ import annotations

import json

import pytest
from accelerate.state import AcceleratorState, GradientState

from scripts import benchmark


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def test_tiny_benchmark_prints_and_writes_every_entry(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--tiny", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == doc
    assert doc["mode"] == "tiny" and doc["complete"] is True
    assert {"cpu", "cores", "torch_threads", "gpu", "torch"} <= set(doc["machine"])
    assert len(doc["load_average_before"]) == 3 and len(doc["load_average_after"]) == 3
    names = [e["name"] for e in doc["entries"]]
    assert names == [
        "step_overhead[tiny]",
        "step_overhead[demo base]",
        "mfu_fp32",
        "mfu_bf16",
        "attention_kernels",
        "memory",
        "gradcache_memory",
        "data_pipeline",
        "embedding_throughput",
    ]
    for e in doc["entries"]:
        assert {"name", "model", "batch", "precision", "measured", "ratio", "target", "met", "notes", "seconds"} <= set(e)
        assert e["met"] in (True, False, None) and e["target"]
    step = doc["entries"][0]["measured"]
    assert step["toolkit_s_per_step"] > 0 and step["minimal_s_per_step"] > 0
    memory = doc["entries"][5]["measured"]
    assert {"full", "lora", "qlora"} <= set(memory)
    rates = doc["entries"][7]["measured"]["images_per_s_per_worker"]
    assert set(rates) == {"jpeg_full_decode", "jpeg_draft", "png", "preresized_cache"} and min(rates.values()) > 0
    assert set(doc["entries"][8]["measured"]["demo_source_t2i_R@1"]) == {"fp32", "bf16", "int8"}
    attention = doc["entries"][4]["measured"]
    assert set(attention) == {"bf16_17_tokens", "bf16_50_tokens", "fp32_17_tokens", "fp32_50_tokens"}
    assert all(a["sdpa_ms"] > 0 and a["eager_ms"] > 0 for a in attention.values())
    for mfu in doc["entries"][2:4]:
        where = mfu["measured"]["time_by_op"]
        assert 0 < where["matmul_share"] <= 1 and 0 <= where["copy_share"] <= 1 and len(where["top"]) == 8


def test_faiss_entry_measures_the_index_the_toolkit_builds_within_its_budget():
    from finetune.retrieval.index import choose_factory

    (e,) = benchmark.bench_faiss((20_000,), dim=64)
    m = e["measured"]
    expected, _ = choose_factory(20_000, 64, int(benchmark.FAISS_MEMORY_SHARE * (20_000 * 64 * 4 + 0)))
    assert m["index"].startswith(expected + ", nprobe=") and "residual scalar codes" in m["selection_reason"]
    assert m["memory_ratio"] <= benchmark.FAISS_MEMORY_SHARE + 0.01
    assert 0 < m["recall_at_10"] <= 1 and m["tuning"][-1]["recall_at_10"] == m["recall_at_10_tuning"]
    assert e["met"] is None  # the target is stated at 1M vectors
